"""Running the teacher over a shard and writing its caches, resumably.

Two jobs per shard:

* :func:`capture_topk` — one full teacher pass that writes the top-k cache **and** the pooled
  embedding cache (the final hidden state is needed for the logits anyway);
* :func:`capture_hidden` — a pass that stops after the deepest requested layer (no later layers, no
  LM head) and writes the hidden-state cache.

Documents are tokenised once, sorted by length and batched, so little compute goes to padding. Every
``rows_per_part`` documents (in that sorted order) are written as a finished part file under
``results/cache/.partial/…``, outside the rule's declared output: a job killed or preempted midway
resumes from its finished parts; the declared output is assembled from them at the end, atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from kdflow import __version__
from kdflow.cache_format import FORMAT_VERSION, PartWriter, assemble, embed_schema, fixed, hidden_schema, ragged, topk_schema
from kdflow.config import config_hash
from kdflow.models import load_model, load_tokenizer, read_manifest, tokenizer_fingerprint
from kdflow.provenance import file_sha256, git_commit

log = logging.getLogger(__name__)
FP16_MAX = float(np.finfo(np.float16).max)
LOGPROB_FLOOR = -1.0e4  # log-probabilities below this (incl. -inf) are stored as this


class _Stop(Exception):
    """Raised from a forward hook once the deepest requested layer has run."""


@dataclass
class Tokenised:
    """A shard's documents as the teacher sees them, in shard order."""

    doc_ids: list[str]
    ids: list[np.ndarray]        # int32 token ids, truncated to max_length
    texts: list[str]             # the part of each document those tokens cover
    truncated: np.ndarray        # bool per document


def tokenise_shard(shard: str | Path, tokenizer, max_length: int) -> Tokenised:
    table = pq.read_table(shard, columns=["doc_id", "text"])
    doc_ids, texts = table.column("doc_id").to_pylist(), table.column("text").to_pylist()
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
    ids, covered, truncated = [], [], []
    for text, row, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        cut = row[:max_length]
        ids.append(np.asarray(cut, dtype=np.int32))
        truncated.append(len(row) > max_length)
        covered.append(text[: offsets[len(cut) - 1][1]] if len(row) > max_length and cut else text)
    return Tokenised(doc_ids, ids, covered, np.asarray(truncated, dtype=bool))


def length_order(tok: Tokenised) -> np.ndarray:
    """Document indices sorted by length (stable), the processing order of every pass."""
    return np.argsort(np.asarray([len(x) for x in tok.ids]), kind="stable")


def pad_batch(tok: Tokenised, index: np.ndarray, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(tok.ids[i]) for i in index)
    ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index):
        ids[row, : len(tok.ids[i])] = tok.ids[i]
        mask[row, : len(tok.ids[i])] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def topk_of_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module, k: int, chunk: int = 512):
    """Top-k ids, full-vocabulary log-probs and the log of the remaining mass for each row of ``hidden``.

    ``hidden`` is [T, H] (valid positions only). Logits are made ``chunk`` rows at a time in fp32, so a
    128k vocabulary never needs a [T, V] tensor.
    """
    ids_out, lp_out, rest_out = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start:start + chunk]).float()
        values, ids = torch.topk(logits, k, dim=-1)
        # One exp pass, in place, shifted by the row maximum (the top-1 value): the total gives the
        # log-normaliser, and the sum with the k entries zeroed gives the mass outside the k directly
        # (not as 1 - sum, which would lose precision when the k hold nearly all of it).
        probs = logits.sub_(values[:, :1]).exp_()
        log_total = probs.sum(-1, keepdim=True).log_()
        rest = probs.scatter_(-1, ids, 0.0).sum(-1, keepdim=True).log_() - log_total
        ids_out.append(ids.to(torch.int32))
        lp_out.append(values - values[:, :1] - log_total)
        rest_out.append(rest.squeeze(-1))
    return torch.cat(ids_out), torch.cat(lp_out), torch.cat(rest_out)


def _to_f16(x: torch.Tensor, floor: float | None = None) -> tuple[np.ndarray, int]:
    """fp16 NumPy copy; values beyond fp16's range are clamped (and counted) rather than made inf."""
    x = x.float()
    lo = -FP16_MAX if floor is None else floor
    clamped = int(((x > FP16_MAX) | (x < lo)).sum())
    return x.clamp(lo, FP16_MAX).cpu().numpy().astype(np.float16), clamped


# --------------------------------------------------------------------------- the resumable shard job

@dataclass
class CacheJob:
    """What one cache job needs to know; ``meta`` goes into every file it writes."""

    kind: str                     # "topk" (+ embed) or "hidden"
    shard: Path
    outputs: dict[str, Path]      # {"topk": …, "embed": …} or {"hidden": …}
    partial_dir: Path
    teacher_manifest: Path
    settings: dict[str, Any]      # config["teacher_cache"]

    def base_meta(self, teacher_info: dict, tokenizer, n_layers: int, keys: Sequence[str]) -> dict[str, Any]:
        """Provenance for every file of this job; ``keys`` are the settings that change its content."""
        s = self.settings
        return {
            "format_version": FORMAT_VERSION, "kdflow_version": __version__, "git_commit": git_commit(),
            "teacher": teacher_info["name"], "teacher_source_hash": teacher_info.get("source_hash"),
            "teacher_revision": teacher_info.get("revision"), "teacher_layers": n_layers,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "max_length": s["max_length"], "dtype": s["dtype"], "value_dtype": "float16",
            "shard": self.shard.stem, "shard_sha256": file_sha256(self.shard),
            "settings_hash": config_hash({k: s[k] for k in ("max_length", "dtype", "rows_per_part", *keys)}),
        }

    def with_resume_key(self, meta: dict[str, Any]) -> dict[str, Any]:
        """``meta`` plus the key a finished part must match to be reused: the settings, the teacher's
        weights and tokenizer, and the shard's bytes."""
        keys = ("settings_hash", "teacher_source_hash", "teacher_revision", "tokenizer_fingerprint", "shard_sha256")
        return {**meta, "resume_key": config_hash({k: meta[k] for k in keys})}


def _part_paths(job: CacheJob, names: Sequence[str], part: int) -> dict[str, Path]:
    return {n: job.partial_dir / f"{n}_part{part:05d}.parquet" for n in names}


def _finished(paths: dict[str, Path], meta: dict[str, Any]) -> bool:
    """A part counts as done when all its files exist and carry this job's resume key (same settings,
    teacher weights, tokenizer and shard bytes)."""
    try:
        for p in paths.values():
            raw = pq.read_schema(p).metadata or {}
            if json.loads(raw[b"kdflow.resume_key"]) != meta["resume_key"]:
                return False
    except (OSError, KeyError, ValueError):
        return False
    return True


def run_cache_job(job: CacheJob, metas: dict[str, dict], schemas: dict[str, Any], tok: Tokenised,
                  make_part: Callable[[np.ndarray], dict[str, dict]], progress_desc: str) -> dict[str, Any]:
    """Process ``tok`` in length order, part by part, skipping finished parts; then assemble outputs."""
    s = job.settings
    order = length_order(tok)
    rows = s["rows_per_part"]
    n_parts = max(1, -(-len(order) // rows))
    writers = {name: PartWriter(schemas[name]) for name in job.outputs}
    job.partial_dir.mkdir(parents=True, exist_ok=True)
    t0, tokens_done, resumed = time.perf_counter(), 0, 0
    total_tokens = int(sum(len(x) for x in tok.ids))
    bar = tqdm(total=total_tokens, desc=progress_desc, unit="tok", unit_scale=True, mininterval=1)
    all_parts: dict[str, list[Path]] = {name: [] for name in job.outputs}
    for part in range(n_parts):
        index = order[part * rows:(part + 1) * rows]
        paths = _part_paths(job, list(job.outputs), part)
        for name in job.outputs:
            all_parts[name].append(paths[name])
        part_tokens = int(sum(len(tok.ids[i]) for i in index))
        if _finished(paths, metas[next(iter(job.outputs))]):
            resumed += 1
            bar.update(part_tokens)
            continue
        columns = make_part(index)
        for name, cols in columns.items():
            writers[name].write(paths[name], cols, metas[name])
        tokens_done += part_tokens
        bar.update(part_tokens)
        bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
    sizes = {name: assemble(all_parts[name], job.outputs[name], metas[name]) for name in job.outputs}
    shutil.rmtree(job.partial_dir, ignore_errors=True)
    summary = {"cache": job.kind, "shard": job.shard.stem, "documents": len(order), "tokens": total_tokens,
               "tokens_computed": tokens_done, "parts": n_parts, "parts_resumed": resumed,
               "truncated_documents": int(tok.truncated.sum()), "seconds": round(seconds, 3),
               "tokens_per_s": round(tokens_done / seconds, 1) if tokens_done else None,
               "bytes_written": sum(sizes.values()), "bytes": dict(sizes)}
    return summary


def _setup(job: CacheJob):
    s = job.settings
    info = read_manifest(job.teacher_manifest)
    tokenizer = load_tokenizer(info)
    model = load_model(info, s["device"], s["dtype"])
    tok = tokenise_shard(job.shard, tokenizer, s["max_length"])
    if tok.truncated.any():
        log.info("%s: %d of %d documents truncated to %d tokens", job.shard, int(tok.truncated.sum()),
                 len(tok.ids), s["max_length"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return info, tokenizer, model, tok, pad_id


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def capture_topk(job: CacheJob) -> dict[str, Any]:
    """The top-k cache and the pooled-embedding cache of one shard, from one teacher pass."""
    s = job.settings
    k = s["k"]
    info, tokenizer, model, tok, pad_id = _setup(job)
    base = job.base_meta(info, tokenizer, model.config.num_hidden_layers, ["k"])
    hidden_size = model.config.hidden_size
    base = job.with_resume_key(base)
    metas = {"topk": {**base, "cache": "topk", "k": k}, "embed": {**base, "cache": "embed", "hidden_size": hidden_size}}
    schemas = {"topk": topk_schema(k), "embed": embed_schema(hidden_size)}
    device = _input_device(model)
    clamped = {"rest_logprob": 0, "embedding": 0}

    def make_part(index: np.ndarray) -> dict[str, dict]:
        ids_l, lp_l, rest_l, emb_l = [], [], [], []
        for start in range(0, len(index), s["batch_size"]):
            batch = index[start:start + s["batch_size"]]
            ids, mask = pad_batch(tok, batch, pad_id, device)
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            valid = mask.bool().to(hidden.device)
            top_ids, top_lp, rest = topk_of_hidden(hidden[valid], model.get_output_embeddings(), k)
            ids_l.append(top_ids.cpu().numpy())
            lp_l.append(top_lp)
            rest_l.append(rest)
            m = valid.unsqueeze(-1).to(torch.float32)
            emb_l.append((hidden.float() * m).sum(1) / m.sum(1))
        lengths = np.asarray([len(tok.ids[i]) for i in index], dtype=np.int32)
        lp, _ = _to_f16(torch.cat(lp_l), LOGPROB_FLOOR)
        rest, n_rest = _to_f16(torch.cat(rest_l), LOGPROB_FLOOR)
        emb, n_emb = _to_f16(torch.cat(emb_l))
        clamped["rest_logprob"] += n_rest
        clamped["embedding"] += n_emb
        doc_index = index.astype(np.int32)
        doc_ids = [tok.doc_ids[i] for i in index]
        return {
            "topk": {"doc_index": doc_index, "doc_id": doc_ids, "n_tokens": lengths,
                     "truncated": tok.truncated[index], "input_ids": ragged(np.concatenate([tok.ids[i] for i in index]), lengths),
                     "topk_ids": ragged(np.concatenate(ids_l), lengths), "topk_logprobs": ragged(lp, lengths),
                     "rest_logprob": ragged(rest, lengths)},
            "embed": {"doc_index": doc_index, "doc_id": doc_ids, "n_tokens": lengths,
                      "text": [tok.texts[i] for i in index], "embedding": fixed(emb)},
        }

    summary = run_cache_job(job, metas, schemas, tok, make_part, f"top-{k} {job.shard.stem}")
    summary["values_clamped"] = clamped
    return summary


def hidden_positions(n_tokens: int, ratio: float, seed: int, doc_index: int) -> np.ndarray:
    """The token positions a hidden-state cache keeps for one document: all, or a seeded sorted subset."""
    if ratio >= 1.0:
        return np.arange(n_tokens, dtype=np.int32)
    n = max(1, int(round(ratio * n_tokens)))
    rng = np.random.default_rng([seed, doc_index])
    return np.sort(rng.choice(n_tokens, size=n, replace=False)).astype(np.int32)


def layer_hooks(model, layers: Sequence[int], captured: dict[int, torch.Tensor]) -> list:
    """Forward hooks that record ``hidden_states[l]`` (transformers' numbering: 0 = embeddings, l = output
    of decoder layer l-1, L = after the final norm) and stop the forward after the deepest one."""
    n = model.config.num_hidden_layers
    deepest = max(layers)
    base = model.get_decoder()

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _Stop
        return hook

    handles = []
    for layer in sorted(set(layers)):
        module = base.embed_tokens if layer == 0 else base.norm if layer == n else base.layers[layer - 1]
        handles.append(module.register_forward_hook(hook_for(layer)))
    return handles


@torch.inference_mode()
def capture_hidden(job: CacheJob) -> dict[str, Any]:
    """The hidden-state cache of one shard, from a pass that stops after the deepest requested layer."""
    s = job.settings
    layers = sorted(set(s["hidden_layers"]))
    info, tokenizer, model, tok, pad_id = _setup(job)
    n = model.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer <= n]
    if bad:
        raise ValueError(f"teacher_cache.hidden_layers: {bad} out of range; the teacher has hidden states 0..{n}")
    hidden_size = model.config.hidden_size
    meta = {**job.with_resume_key(job.base_meta(info, tokenizer, n,
                                                ["hidden_layers", "hidden_token_ratio", "hidden_token_seed"])),
            "cache": "hidden", "layers": layers, "hidden_size": hidden_size,
            "token_ratio": s["hidden_token_ratio"], "token_seed": s["hidden_token_seed"]}
    device = _input_device(model)
    captured: dict[int, torch.Tensor] = {}
    handles = layer_hooks(model, layers, captured)
    clamped = [0]

    def make_part(index: np.ndarray) -> dict[str, dict]:
        pos_l, per_layer = [], {layer: [] for layer in layers}
        for start in range(0, len(index), s["batch_size"]):
            batch = index[start:start + s["batch_size"]]
            ids, mask = pad_batch(tok, batch, pad_id, device)
            captured.clear()
            try:
                model.get_decoder()(input_ids=ids, attention_mask=mask)
            except _Stop:
                pass
            for row, i in enumerate(batch):
                pos = hidden_positions(len(tok.ids[i]), s["hidden_token_ratio"], s["hidden_token_seed"], int(i))
                pos_l.append(pos)
                sel = torch.from_numpy(pos).long()
                for layer in layers:
                    per_layer[layer].append(captured[layer][row].index_select(0, sel.to(captured[layer].device)))
        lengths = np.asarray([len(p) for p in pos_l], dtype=np.int32)
        cols: dict[str, Any] = {"doc_index": index.astype(np.int32), "doc_id": [tok.doc_ids[i] for i in index],
                                "n_tokens": np.asarray([len(tok.ids[i]) for i in index], dtype=np.int32),
                                "positions": ragged(np.concatenate(pos_l), lengths)}
        for layer in layers:
            values, n_clamped = _to_f16(torch.cat(per_layer[layer]))
            clamped[0] += n_clamped
            cols[f"hidden_l{layer}"] = ragged(values, lengths)
        return {"hidden": cols}

    try:
        summary = run_cache_job(job, {"hidden": meta}, {"hidden": hidden_schema(hidden_size, layers)}, tok,
                                make_part, f"hidden {layers} {job.shard.stem}")
    finally:
        for h in handles:
            h.remove()
    summary["values_clamped"] = clamped[0]
    summary["layers"] = layers
    summary["passes_per_token"] = max(layers) / n
    return summary


"""Running the teacher over a shard and writing its caches, resumably.

Two jobs per shard:

* :func:`capture_topk` — one full teacher pass that writes the top-k cache **and** the pooled
  embedding cache (the final hidden state is needed for the logits anyway);
* :func:`capture_hidden` — a pass that stops after the deepest requested layer (no later layers, no
  LM head) and writes the hidden-state cache.

Both run as a resumable shard job (kdflow.cache_job): documents tokenised once, sorted by length and
batched, and written ``rows_per_part`` documents at a time as finished part files that a rerun of a
killed job reuses; the declared output is assembled from them at the end, atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kdflow.cache_format import (
    HIDDEN_DTYPES,
    CacheError,
    CacheMeta,
    embed_schema,
    fixed,
    hidden_schema,
    ragged,
    topk_schema,
)
from kdflow.cache_fp8 import FP8, fp8_encode, ragged_bytes
from kdflow.cache_job import CacheJob, Tokenised, pad_batch, rank_of_ranks, run_cache_job, tokenise_shard
from kdflow.cache_logits import (  # noqa: F401  (topk_of_hidden: re-exported)
    LogitCodec,
    draw_uniforms,
    logits_of_hidden,
    to_f16,
    topk_of_hidden,
    uniform_width,
)
from kdflow.manifest import ModelManifest
from kdflow.models import input_device, load_model, load_tokenizer, pad_id_of, read_manifest
from kdflow.teacher_parallel import job_ranks, run_on_ranks

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a forward hook once the deepest requested layer has run."""


class TeacherSetup(NamedTuple):
    """What a cache job runs on: the teacher (manifest, tokenizer, model), the shard as it sees it, and the
    pad id of its batches."""

    info: ModelManifest
    tokenizer: Any
    model: torch.nn.Module
    tok: Tokenised
    pad_id: int
    load_s: float = 0.0  # seconds to load the teacher's tokenizer and weights (model load, not compute)


def setup_cache_job(job: CacheJob) -> TeacherSetup:
    """Load the job's teacher (``device`` and ``dtype`` of its settings) and tokenise its shard."""
    s = job.settings
    t0 = time.perf_counter()
    info = read_manifest(job.teacher_manifest)
    tokenizer = load_tokenizer(info)
    model = load_model(info, s["device"], s["dtype"], tp_size=rank_of_ranks()[1])
    load_s = time.perf_counter() - t0
    tok = tokenise_shard(job.shard, tokenizer, s["max_length"])
    if tok.truncated.any():
        log.info(
            "%s: %d of %d documents truncated to %d tokens",
            job.shard,
            int(tok.truncated.sum()),
            len(tok.ids),
            s["max_length"],
        )
    return TeacherSetup(info, tokenizer, model, tok, pad_id_of(tokenizer), load_s)


@dataclass
class TopkPass:
    """The top-k job before it runs: its files' metadata and schemas, and ``make_part(index)``, which runs
    the teacher on those documents (shard rows, in length order) and returns both files' part columns."""

    metas: dict[str, CacheMeta]
    schemas: dict[str, Any]
    make_part: Callable[[np.ndarray], dict[str, dict]]
    clamped: dict[str, int]  # values clamped to fp16's range so far, per column
    codec: LogitCodec  # how the logit columns are encoded (and what the encoding has cost so far)


@torch.inference_mode()
def capture_topk(job: CacheJob, setup: TeacherSetup | None = None) -> dict[str, Any] | None:
    """The top-k cache and the pooled-embedding cache of one shard, from one teacher pass.

    ``setup``: an already loaded teacher and tokenised shard (default: :func:`setup_cache_job`)."""
    setup = setup_cache_job(job) if setup is None else setup
    plan = topk_pass(job, setup)
    s = job.settings
    label = f"top-{s['k']}" + (f" + {s['samples']} samples" if s.get("samples") else "")
    summary = run_cache_job(job, plan.metas, plan.schemas, setup.tok, plan.make_part, f"{label} {job.shard.stem}")
    if summary is not None:  # None: a tensor-parallel rank other than 0
        summary["values_clamped"] = plan.clamped
        summary.update(plan.codec.stats)  # the compact encoding's own error and the mass its floor moved
        summary["load_s"] = round(setup.load_s, 3)
    return summary


def topk_pass(job: CacheJob, setup: TeacherSetup) -> TopkPass:
    """What :func:`capture_topk` runs, nothing computed yet (bench/capture.py times ``make_part`` alone)."""
    s = job.settings
    k, samples = s["k"], s.get("samples", 0)
    info, tokenizer, model, tok, pad_id, _ = setup
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    codec = LogitCodec.of(s, vocab_rows)
    # The optional settings (a tail, the compact encoding) are hashed only when set: caches from before them resume.
    base = job.base_meta(info, tokenizer, model.config.num_hidden_layers, ["k", *codec.hashed_keys])
    hidden_size = model.config.hidden_size
    metas = {
        "topk": CacheMeta(**base, cache="topk", k=k, **codec.meta),
        "embed": CacheMeta(**base, cache="embed", hidden_size=hidden_size),
    }
    schemas = {"topk": topk_schema(k, samples, codec.encoding, vocab_rows), "embed": embed_schema(hidden_size)}
    # A logit cache beside the study's main one (another k or tail) is written without an embed file.
    metas = {name: meta for name, meta in metas.items() if name in job.outputs}
    device = input_device(model)
    clamped = codec.clamped

    @torch.inference_mode()
    def make_part(index: np.ndarray) -> dict[str, dict]:
        ids_l, lp_l, rest_l, emb_l, tail_l = [], [], [], [], []
        for start in range(0, len(index), s["batch_size"]):
            batch = index[start : start + s["batch_size"]]
            ids, mask = pad_batch(tok, batch, pad_id, device)
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            valid = mask.bool().to(hidden.device)
            uniforms = None
            if samples:
                width = uniform_width(samples, codec.sampling)
                u = [draw_uniforms(s["sample_seed"], i, len(tok.ids[i]), width) for i in batch]
                uniforms = torch.from_numpy(np.concatenate(u))
            lm_head = model.get_output_embeddings()
            head = logits_of_hidden(hidden[valid], lm_head, k, samples, uniforms, sampling=codec.sampling)
            top_ids, top_lp, rest = head[:3]
            if samples:
                tail_l.append([x.cpu().numpy() for x in head[3:]])
            ids_l.append(top_ids.cpu().numpy())
            lp_l.append(top_lp)
            rest_l.append(rest)
            m = valid.unsqueeze(-1).to(torch.float32)
            emb_l.append((hidden.float() * m).sum(1) / m.sum(1))
        lengths = np.asarray([len(tok.ids[i]) for i in index], dtype=np.int32)
        tail = [np.concatenate(x) for x in zip(*tail_l, strict=True)] if samples else None
        logits = codec.columns(np.concatenate(ids_l), torch.cat(lp_l), torch.cat(rest_l), tail, lengths)
        emb, n_emb = to_f16(torch.cat(emb_l))
        clamped["embedding"] += n_emb
        doc_index = index.astype(np.int32)
        doc_ids = [tok.doc_ids[i] for i in index]
        return {
            "topk": {
                "doc_index": doc_index,
                "doc_id": doc_ids,
                "n_tokens": lengths,
                "truncated": tok.truncated[index],
                "input_ids": ragged(np.concatenate([tok.ids[i] for i in index]), lengths),
                **logits,
            },
            "embed": {
                "doc_index": doc_index,
                "doc_id": doc_ids,
                "n_tokens": lengths,
                "text": [tok.texts[i] for i in index],
                "embedding": fixed(emb),
            },
        }

    return TopkPass(metas, schemas, make_part, clamped, codec)


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
def capture_hidden(job: CacheJob, setup: TeacherSetup | None = None) -> dict[str, Any] | None:
    """The hidden-state cache of one shard, from a pass that stops after the deepest requested layer.

    ``setup``: an already loaded teacher and tokenised shard (default: :func:`setup_cache_job`)."""
    s = job.settings
    layers = sorted(set(s["hidden_layers"]))
    setup = setup_cache_job(job) if setup is None else setup
    info, tokenizer, model, tok, pad_id, load_s = setup
    n = model.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer <= n]
    if bad:
        raise CacheError(
            f"teacher_cache.hidden_layers: {bad} out of range; the teacher {info.name!r} has hidden states 0..{n} "
            f"(0 = embeddings, {n} = after the final norm)"
        )
    hidden_size = model.config.hidden_size
    value_dtype = HIDDEN_DTYPES[s.get("hidden_dtype", "float16")]
    keys = ["hidden_layers", "hidden_token_ratio", "hidden_token_seed"]
    # the default (float16) is hashed as before the setting existed, so that caches built then are still resumed
    base = job.base_meta(info, tokenizer, n, keys if value_dtype == "float16" else [*keys, "hidden_dtype"])
    meta = CacheMeta(
        **{**base, "value_dtype": value_dtype},
        cache="hidden",
        layers=tuple(layers),
        hidden_size=hidden_size,
        token_ratio=s["hidden_token_ratio"],
        token_seed=s["hidden_token_seed"],
    )
    device = input_device(model)
    captured: dict[int, torch.Tensor] = {}
    handles = layer_hooks(model, layers, captured)
    clamped = [0]

    def make_part(index: np.ndarray) -> dict[str, dict]:
        pos_l, per_layer = [], {layer: [] for layer in layers}
        for start in range(0, len(index), s["batch_size"]):
            batch = index[start : start + s["batch_size"]]
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
        cols: dict[str, Any] = {
            "doc_index": index.astype(np.int32),
            "doc_id": [tok.doc_ids[i] for i in index],
            "n_tokens": np.asarray([len(tok.ids[i]) for i in index], dtype=np.int32),
            "positions": ragged(np.concatenate(pos_l), lengths),
        }
        for layer in layers:
            if value_dtype == FP8:  # per-position scales: nothing saturates, nothing is clamped
                codes, scale = fp8_encode(torch.cat(per_layer[layer]))
                cols[f"hidden_l{layer}"] = ragged_bytes(codes, lengths)
                cols[f"hidden_l{layer}_scale"] = ragged(scale, lengths)
                continue
            values, n_clamped = to_f16(torch.cat(per_layer[layer]))
            clamped[0] += n_clamped
            cols[f"hidden_l{layer}"] = ragged(values, lengths)
        return {"hidden": cols}

    try:
        summary = run_cache_job(
            job,
            {"hidden": meta},
            {"hidden": hidden_schema(hidden_size, layers, value_dtype)},
            tok,
            make_part,
            f"hidden {layers} {job.shard.stem}",
        )
    finally:
        for h in handles:
            h.remove()
    if summary is None:  # a tensor-parallel rank other than 0
        return None
    summary["values_clamped"] = clamped[0]
    summary["load_s"] = round(load_s, 3)
    summary["layers"] = layers
    summary["passes_per_token"] = max(layers) / n
    return summary


def run_tensor_parallel(job: CacheJob, ranks: int, threads: int | None, log_file: str | Path | None) -> dict[str, Any]:
    """Run the cache ``job`` on ``ranks`` tensor-parallel ranks and return rank 0's summary."""
    summary = run_on_ranks(
        {"kind": "cache", "job": job.to_json()},
        job.partial_dir,
        ranks,
        job.settings["device"],
        f"{job.kind} cache job of {job.shard.stem} on {ranks} tensor-parallel ranks",
        f"The parts rank 0 finished are kept in {job.partial_dir}: a rerun resumes from them.",
        threads,
        log_file,
    )
    summary["tensor_parallel_ranks"] = ranks
    return summary


def run_cache_rule(
    kind: str,
    shard: str | Path,
    outputs: dict[str, str | Path],
    partial_dir: str | Path,
    teacher_manifest: str | Path,
    settings: dict[str, Any],
    threads: int | None = None,
    telemetry: Any = None,
    log_file: str | Path | None = None,
) -> dict[str, Any]:
    """One topk_cache (``kind="topk"``) or hidden_cache (``"hidden"``) job: capture the shard on ``threads``
    CPU threads inside ``telemetry`` (a :func:`kdflow.telemetry.job_telemetry` not yet entered), count this
    attempt's tokens into it (parts resumed from a killed attempt cost nothing now), log the summary and
    return it. With ``parallel: tensor`` on more than one rank (kdflow.teacher_parallel.job_ranks) the capture
    runs on torchrun's ranks (they append their log lines to ``log_file``)."""
    if threads:
        torch.set_num_threads(threads)
    job = CacheJob(
        kind=kind,
        shard=Path(shard),
        outputs={k: Path(v) for k, v in outputs.items()},
        partial_dir=Path(partial_dir),
        teacher_manifest=Path(teacher_manifest),
        settings=dict(settings),
    )
    ranks = job_ranks(job.settings)
    with telemetry if telemetry is not None else contextlib.nullcontext() as tel:
        if ranks > 1:
            summary = run_tensor_parallel(job, ranks, threads, log_file)
        else:
            summary = capture_topk(job) if kind == "topk" else capture_hidden(job)
        if tel is not None:
            tel.tokens = summary["tokens_computed"]
            tel.load_s, tel.compute_s = summary["load_s"], summary["seconds"]
    log.info("summary %s", json.dumps(summary, sort_keys=True))
    return summary

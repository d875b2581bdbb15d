"""What the teacher caches cost: capture throughput against a bare forward, bytes per token, passes per token.

Runs the prepared teacher on this machine over a few length-sorted batches of a shard and measures, for
kdflow's writers (kdflow.teacher_pass / kdflow.cache_job / kdflow.cache_format) and for a naive writer baseline:

* ``capture_ratio``: tokens/s of the top-k + embedding capture (the real ``make_part`` of
  ``capture_topk``, from ``topk_pass``, plus ``PartWriter.write`` of its two part files) over tokens/s of a
  bare ``model(input_ids=ids, attention_mask=mask)`` forward returning logits, on the same batches.
  The methods alternate batch by batch (their order rotating), for ``--rounds`` rounds. Tokens/s are
  medians over rounds; ``capture_ratio`` is the median of the per-round ratios (a round times both on
  the same batches); the per-round values, the ratio of the medians and the ratio of the fastest round
  of each batch (``*_best``: noise only adds time) are reported too.
* bytes per token of real cache files: top-k at k=16 and k=64 and the hidden cache (one layer, all
  tokens) per hidden dimension, in float16 and in float8 (``hidden_dtype: float8``:
  ``hidden_bytes_per_token_per_dim_fp8``), each written by the real ``capture_topk`` / ``capture_hidden`` jobs
  (``run_cache_job``: parts of ``rows_per_part`` documents, then ``assemble``, zstd).
* logit caches of the other settings (``LOGIT_SETTINGS``: the compact encoding with and without a probability floor,
  sampled tails of independent and of systematic draws, plain and compact), each written by a real ``capture_topk``
  job on the measured documents: ``logit_bytes_per_token``, ``logit_encoding_kl_max`` (the job's own report, compact
  only) and ``logit_loader_docs_per_s`` (the training stream over the file, decoding and ``collate`` included, best of
  5 epochs; ``top16`` is the plain top-16 file). ``capture_ratio_compact`` and ``capture_ratio_sampled``: as
  ``capture_ratio``, for the compact capture of ``COMPACT_TIMED`` and the sampled-tail capture of ``SAMPLED_TIMED``
  (timed in the same rounds, alternating with the others).
* passes per token: decoder-layer calls (forward hooks) during those real top-k and hidden jobs, in
  units of full passes (``num_layers`` x forward batches); the goal is 1 + l/L.

The naive baseline: a full forward with logits, ``log_softmax`` over the vocabulary, ``topk``, then
Python lists (float64 values, int64 ids) per document via ``pa.Table.from_pylist`` and ``pq.write_table``
with pyarrow's defaults; one full teacher pass per cache (top-k, embedding, hidden). Its
``naive_capture_ratio`` times the top-k cache alone (its embedding needs another pass, not timed), so it
flatters the naive writer.

Prints a table, then one JSON object as the last line. Needs the prepared teacher and the shard
(`snakemake --cores all resources/models/smollm2-135m-instruct/kdflow_model.json results/shards/heldout.parquet`).

    python bench/capture.py --quick           # 4 batches of 8 documents x <=48 tokens, 3 rounds (~1.5-2 min)
    python bench/capture.py --batches 3       # 3 batches at the configured max_length (256) (~4-5 min)

On a shared machine the default thread count (all cores) is at the mercy of other processes: one busy
core stalls every multi-threaded op. ``--threads 1`` gives steadier figures there.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # run_cache_job's progress bar; read when tqdm is imported

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdflow import teacher_pass as tp
from kdflow.cache_format import CacheReader, PartWriter
from kdflow.cache_job import CacheJob, Tokenised, length_order, pad_batch
from kdflow.config import load_config
from kdflow.models import input_device

DEFAULT_TEACHER = "resources/models/smollm2-135m-instruct/kdflow_model.json"
DEFAULT_SHARD = "results/shards/heldout.parquet"
METHODS = ("bare", "capture", "compact", "sampled", "naive")
# The compact capture timed beside the plain one (teacher_cache.logit_encoding: compact, its probability floor),
# and a capture with a sampled tail (the default study's rb cache: an exact head of 4 and 12 draws).
COMPACT_TIMED = {"logit_encoding": "compact", "logit_floor": 0.005}
SAMPLED_TIMED = {"k": 4, "samples": 12, "sample_seed": 0}
# Logit caches whose files are measured (real capture_topk jobs on the measured documents): name -> settings.
LOGIT_SETTINGS = {
    "top16_compact": {"k": 16, "logit_encoding": "compact", "logit_floor": 0.0},
    "top16_compact_floor1e-3": {"k": 16, "logit_encoding": "compact", "logit_floor": 0.001},
    "top16_compact_floor5e-3": {"k": 16, "logit_encoding": "compact", "logit_floor": 0.005},
    "top16_compact_floor1e-2": {"k": 16, "logit_encoding": "compact", "logit_floor": 0.01},
    "samples12": {"k": 0, "samples": 12, "sample_seed": 0},
    "samples12_compact": {"k": 0, "samples": 12, "sample_seed": 0, "logit_encoding": "compact", "logit_floor": 0.0},
    "samples16_compact": {"k": 0, "samples": 16, "sample_seed": 0, "logit_encoding": "compact", "logit_floor": 0.0},
    "samples8_systematic": {"k": 0, "samples": 8, "sample_seed": 0, "sampling": "systematic"},
    "samples8_systematic_compact": {
        "k": 0,
        "samples": 8,
        "sample_seed": 0,
        "sampling": "systematic",
        "logit_encoding": "compact",
        "logit_floor": 0.0,
    },
    "samples12_systematic": {"k": 0, "samples": 12, "sample_seed": 0, "sampling": "systematic"},
    "head4_samples12_compact": {
        "k": 4,
        "samples": 12,
        "sample_seed": 0,
        "logit_encoding": "compact",
        "logit_floor": 0.0,
    },
}


def require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        sys.exit(f"bench/capture.py: the {what} {path} is missing; make it with `snakemake --cores all {path}`")
    return path


# --------------------------------------------------------------------------- counting the real jobs' work


class LayerCounter:
    """Counts decoder-layer calls and forward passes (embedding calls) with forward hooks."""

    def __init__(self, model):
        base = model.get_decoder()
        self.layers = self.forwards = 0
        self.handles = [layer.register_forward_hook(self._layer) for layer in base.layers]
        self.handles.append(base.embed_tokens.register_forward_hook(self._forward))

    def _layer(self, *_):
        self.layers += 1

    def _forward(self, *_):
        self.forwards += 1

    def close(self):
        for h in self.handles:
            h.remove()


def subset(tok: Tokenised, rows: np.ndarray) -> Tokenised:
    return Tokenised(
        [tok.doc_ids[i] for i in rows], [tok.ids[i] for i in rows], [tok.texts[i] for i in rows], tok.truncated[rows]
    )


# --------------------------------------------------------------------------- the naive writer


def naive_topk_rows(tok, index, logp: torch.Tensor, k: int) -> list[dict]:
    values, ids = torch.topk(logp, k, dim=-1)
    rest = torch.log(1.0 - values.double().exp().sum(-1))
    rows = []
    for r, i in enumerate(index):
        n = len(tok.ids[i])
        rows.append(
            {
                "doc_index": int(i),
                "doc_id": tok.doc_ids[i],
                "n_tokens": n,
                "truncated": bool(tok.truncated[i]),
                "input_ids": [int(x) for x in tok.ids[i]],
                "topk_ids": ids[r, :n].tolist(),
                "topk_logprobs": values[r, :n].double().tolist(),
                "rest_logprob": rest[r, :n].tolist(),
            }
        )
    return rows


def naive_capture_step(model, tok, index, ids, mask, k: int, path: Path) -> torch.Tensor:
    """One batch of the naive top-k writer: full logits, log_softmax over the vocabulary, topk, Python lists."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    pq.write_table(pa.Table.from_pylist(naive_topk_rows(tok, index, logp, k)), path)
    return logp


def naive_build_all(model, tok, batches, pad_id, device, ks, layer, out: Path) -> dict[str, int]:
    """All three caches the naive way: one full pass per cache; returns file sizes."""
    writers: dict[str, pq.ParquetWriter] = {}

    def write(name: str, rows: list[dict]):
        table = pa.Table.from_pylist(rows)
        if name not in writers:
            writers[name] = pq.ParquetWriter(out / f"{name}.parquet", table.schema)
        writers[name].write_table(table)

    with torch.inference_mode():
        for index in batches:  # pass 1: top-k (k=16 and k=64 from the same log-probs)
            ids, mask = pad_batch(tok, index, pad_id, device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for k in ks:
                write(f"topk_k{k}", naive_topk_rows(tok, index, logp, k))
            del logp
        for name in ("embed", f"hidden_l{layer}"):  # passes 2 and 3
            for index in batches:
                ids, mask = pad_batch(tok, index, pad_id, device)
                states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                rows = []
                for r, i in enumerate(index):
                    n = len(tok.ids[i])
                    row = {"doc_index": int(i), "doc_id": tok.doc_ids[i], "n_tokens": n}
                    if name == "embed":
                        row["text"] = tok.texts[i]
                        row["embedding"] = states[-1][r, :n].double().mean(0).tolist()
                    else:
                        row["positions"] = list(range(n))
                        row[name] = states[layer][r, :n].double().tolist()
                    rows.append(row)
                write(name, rows)
    for w in writers.values():
        w.close()
    return {name: (out / f"{name}.parquet").stat().st_size for name in writers}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="4 batches, max_length 48 unless --max-length is given (~1.5-2 min on 2 cores)",
    )
    ap.add_argument(
        "--batches",
        type=int,
        default=None,
        help="forward batches, evenly spaced over the length-sorted shard (default 4)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (medians are reported)")
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="the teacher's kdflow_model.json")
    ap.add_argument("--shard", default=DEFAULT_SHARD)
    ap.add_argument("--config", default="config/config.yaml", help="teacher_cache settings come from here")
    ap.add_argument("--max-length", type=int, default=None, help="default: teacher_cache.max_length")
    ap.add_argument("--batch-size", type=int, default=None, help="default: teacher_cache.batch_size")
    ap.add_argument("--out-dir", default=None, help="keep the written files here (default: a temp dir, removed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher_manifest = require(args.teacher, "teacher manifest")
    shard = require(args.shard, "shard")
    settings = dict(load_config(args.config)["teacher_cache"])
    settings["max_length"] = args.max_length or (48 if args.quick else settings["max_length"])
    settings["batch_size"] = args.batch_size or settings["batch_size"]
    n_batches = args.batches or 4
    k, bs = settings["k"], settings["batch_size"]
    layer = max(settings["hidden_layers"])
    ks = sorted({16, 64})

    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="kdflow-bench-capture-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, teacher_manifest, shard, settings, n_batches, k, bs, layer, ks, out)
    finally:
        if not args.out_dir:
            shutil.rmtree(out, ignore_errors=True)
    print_table(result)
    print(json.dumps(result, sort_keys=True))


def run(args, teacher_manifest, shard, settings, n_batches, k, bs, layer, ks, out: Path) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def job(kind: str, outputs: dict[str, Path], job_settings: dict, tag: str) -> CacheJob:
        return CacheJob(
            kind=kind,
            shard=shard,
            outputs=outputs,
            teacher_manifest=teacher_manifest,
            partial_dir=out / "cache" / ".partial" / tag / shard.stem,
            settings=job_settings,
        )

    # the teacher loaded and the shard tokenised once, as every cache job does it; the jobs below reuse them
    setup = tp.setup_cache_job(job("topk", {}, settings, "setup"))
    info, tokenizer, model, tok, pad_id, _ = setup
    n_layers, hidden_size = model.config.num_hidden_layers, model.config.hidden_size
    device = input_device(model)

    # the batches: consecutive slices of the length order (as every pass makes them), evenly spaced
    order = length_order(tok)
    all_batches = [order[s : s + bs] for s in range(0, len(order), bs)]
    if len(all_batches) > 1 and len(all_batches[-1]) < bs:
        all_batches.pop()  # a last, partial batch would weigh its few documents' lengths too much
    picks = sorted(set(np.linspace(0, len(all_batches) - 1, min(n_batches, len(all_batches))).round().astype(int)))
    batches = [all_batches[i] for i in picks]
    tokens = int(sum(len(tok.ids[i]) for b in batches for i in b))
    print(
        f"{shard}: {len(batches)} batches of <= {bs} documents x <= {settings['max_length']} tokens "
        f"({tokens} tokens), {args.rounds} rounds, {torch.get_num_threads()} torch threads",
        flush=True,
    )

    for stale in (out / "cache", out / "naive", out / "timing"):  # a reused --out-dir: no resumed parts
        shutil.rmtree(stale, ignore_errors=True)
    cache_dir = out / "cache" / info.name

    # ------------------------------------------------------------------ timing: bare / capture / naive
    def timed_pass(tag: str, extra: dict):
        """The real make_part of capture_topk with ``extra`` settings (nothing run yet) and its part writers."""
        outputs = {"topk": cache_dir / f"unused_{tag}.parquet", "embed": cache_dir / f"unused_{tag}_e.parquet"}
        plan = tp.topk_pass(job("topk", outputs, {**settings, **extra}, f"timing_{tag}"), setup)
        return plan, {name: PartWriter(schema) for name, schema in plan.schemas.items()}

    plan, writers = timed_pass("plain", {})
    make_part, metas = plan.make_part, plan.metas
    compact_plan, compact_writers = timed_pass("compact", COMPACT_TIMED)
    sampled_plan, sampled_writers = timed_pass("sampled", SAMPLED_TIMED)
    timing_dir = out / "timing"
    timing_dir.mkdir(parents=True, exist_ok=True)
    write_s = [0.0] * args.rounds

    def step(method: str, r: int, j: int, index: np.ndarray) -> float:
        if method == "capture":  # exactly the per-batch work of capture_topk's make_part + writing the parts
            t0 = time.perf_counter()
            cols = make_part(index)
            t1 = time.perf_counter()
            for name, c in cols.items():
                writers[name].write(timing_dir / f"{name}_r{r}_b{j}.parquet", c, metas[name])
            t2 = time.perf_counter()
            write_s[r] += t2 - t1
            return t2 - t0
        if method in ("compact", "sampled"):  # the same, in the compact encoding or with a sampled tail
            variant, variant_writers = (
                (compact_plan, compact_writers) if method == "compact" else (sampled_plan, sampled_writers)
            )
            t0 = time.perf_counter()
            cols = variant.make_part(index)
            for name, c in cols.items():
                variant_writers[name].write(timing_dir / f"{method}{name}_r{r}_b{j}.parquet", c, variant.metas[name])
            return time.perf_counter() - t0
        ids, mask = pad_batch(tok, index, pad_id, device)
        t0 = time.perf_counter()
        if method == "bare":
            logits = model(input_ids=ids, attention_mask=mask).logits
            del logits
        else:
            logp = naive_capture_step(model, tok, index, ids, mask, k, timing_dir / f"naive_r{r}_b{j}.parquet")
            del logp
        return time.perf_counter() - t0

    seconds = {m: [0.0] * args.rounds for m in METHODS}
    per_batch = {m: np.zeros((args.rounds, len(batches))) for m in METHODS}
    with torch.inference_mode():
        warm = max(batches, key=len)  # the longest batch whole: its logits are the largest tensors timed
        for m in METHODS:  # warm-up (allocator, kernels), untimed
            step(m, 0, -1, warm)
        write_s[0] = 0.0
        t_start = time.perf_counter()
        for r in range(args.rounds):
            for j, index in enumerate(batches):
                shift = (r * len(batches) + j) % len(METHODS)
                for m in METHODS[shift:] + METHODS[:shift]:
                    per_batch[m][r, j] = step(m, r, j, index)
                    seconds[m][r] += per_batch[m][r, j]
            print(
                f"  round {r + 1}: " + ", ".join(f"{m} {tokens / seconds[m][r]:.0f} tok/s" for m in METHODS), flush=True
            )
    timing_s = time.perf_counter() - t_start
    shutil.rmtree(timing_dir, ignore_errors=True)
    tps = {m: [tokens / s for s in seconds[m]] for m in METHODS}
    ratio = {m: [a / b for a, b in zip(tps[m], tps["bare"], strict=False)] for m in METHODS if m != "bare"}
    # noise only ever adds time: the fastest of the rounds, batch by batch, is the least disturbed figure
    best = {m: per_batch[m].min(0).sum() for m in METHODS}

    # ------------------------------------------------------------------ sizes and passes: the real jobs
    sub = subset(tok, np.concatenate(batches))  # already length-sorted: its jobs make the same batches
    sub_setup = setup._replace(tok=sub)
    sizes: dict[str, int] = {}
    counts: dict[str, tuple[int, int]] = {}
    for kk in ks:
        outputs = {
            "topk": cache_dir / f"topk_k{kk}" / f"{shard.stem}.parquet",
            "embed": cache_dir / f"embed_k{kk}" / f"{shard.stem}.parquet",
        }
        counter = LayerCounter(model)
        try:
            summary = tp.capture_topk(job("topk", outputs, {**settings, "k": kk}, f"topk_k{kk}"), sub_setup)
        finally:
            counter.close()
        counts[f"topk_k{kk}"] = (counter.layers, counter.forwards)
        sizes[f"topk_k{kk}"], sizes[f"embed_k{kk}"] = summary["bytes"]["topk"], summary["bytes"]["embed"]
    logit_bytes, logit_kl = {}, {}
    logit_loader = {"top16": loader_docs_per_s(cache_dir / "topk_k16" / f"{shard.stem}.parquet", pad_id)}
    for name, extra in LOGIT_SETTINGS.items():
        outputs = {"topk": cache_dir / name / f"{shard.stem}.parquet"}
        summary = tp.capture_topk(job("topk", outputs, {**settings, **extra}, name), sub_setup)
        logit_bytes[name] = round(summary["bytes"]["topk"] / tokens, 2)
        if "encoding_kl_max" in summary:
            logit_kl[name] = float(f"{summary['encoding_kl_max']:.4g}")
        logit_loader[name] = loader_docs_per_s(outputs["topk"], pad_id)
    hidden_settings = {**settings, "hidden_layers": [layer], "hidden_token_ratio": 1.0}
    outputs = {"hidden": cache_dir / f"hidden_l{layer}" / f"{shard.stem}.parquet"}
    counter = LayerCounter(model)
    try:
        summary = tp.capture_hidden(job("hidden", outputs, hidden_settings, f"hidden_l{layer}"), sub_setup)
    finally:
        counter.close()
    counts["hidden"] = (counter.layers, counter.forwards)
    sizes["hidden"] = summary["bytes"]["hidden"]
    # the same hidden cache stored as float8 (e4m3 bytes + a float32 scale a position; not counted in passes)
    fp8_outputs = {"hidden": cache_dir / f"hidden_l{layer}_fp8" / f"{shard.stem}.parquet"}
    fp8_settings = {**hidden_settings, "hidden_dtype": "float8"}
    summary = tp.capture_hidden(job("hidden", fp8_outputs, fp8_settings, f"hidden_l{layer}_fp8"), sub_setup)
    sizes["hidden_fp8"] = summary["bytes"]["hidden"]
    fp8_error = fp8_against_fp16(outputs["hidden"], fp8_outputs["hidden"], layer)
    # read back through the one reader: every token of the measured documents is there
    reader = CacheReader.open(outputs["hidden"], "hidden", {"layers": [layer]}, "bench/capture.py")
    assert sum(len(d["positions"]) for d in reader.iter_docs(["positions"])) == tokens

    naive_dir = out / "naive"
    naive_dir.mkdir(parents=True, exist_ok=True)
    counter = LayerCounter(model)
    try:
        naive_sizes = naive_build_all(model, tok, batches, pad_id, device, ks, layer, naive_dir)
    finally:
        counter.close()
    naive_counts = (counter.layers, counter.forwards)

    topk_layers, forwards = counts[f"topk_k{ks[0]}"]  # the top-k pass (any k) + the hidden pass
    kdflow_layers = topk_layers + counts["hidden"][0]
    med = statistics.median
    result = {
        "capture_ratio": round(med(ratio["capture"]), 4),
        "capture_ratio_rounds": [round(x, 4) for x in ratio["capture"]],
        "capture_ratio_of_medians": round(med(tps["capture"]) / med(tps["bare"]), 4),
        "capture_ratio_best": round(best["bare"] / best["capture"], 4),
        "capture_ratio_compact": round(med(ratio["compact"]), 4),
        "capture_ratio_compact_rounds": [round(x, 4) for x in ratio["compact"]],
        "capture_ratio_compact_best": round(best["bare"] / best["compact"], 4),
        "compact_timed": COMPACT_TIMED,
        "capture_ratio_sampled": round(med(ratio["sampled"]), 4),
        "capture_ratio_sampled_rounds": [round(x, 4) for x in ratio["sampled"]],
        "capture_ratio_sampled_best": round(best["bare"] / best["sampled"], 4),
        "sampled_timed": SAMPLED_TIMED,
        "logit_bytes_per_token": logit_bytes,
        "logit_encoding_kl_max": logit_kl,
        "logit_loader_docs_per_s": logit_loader,
        "naive_capture_ratio_best": round(best["bare"] / best["naive"], 4),
        "capture_write_share": round(sum(write_s) / sum(seconds["capture"]), 4),
        "bare_tokens_per_s": round(med(tps["bare"]), 1),
        "capture_tokens_per_s": round(med(tps["capture"]), 1),
        "naive_capture_tokens_per_s": round(med(tps["naive"]), 1),
        "bare_tokens_per_s_rounds": [round(x, 1) for x in tps["bare"]],
        "capture_tokens_per_s_rounds": [round(x, 1) for x in tps["capture"]],
        "naive_capture_tokens_per_s_rounds": [round(x, 1) for x in tps["naive"]],
        "naive_capture_ratio": round(med(ratio["naive"]), 4),
        "naive_capture_ratio_rounds": [round(x, 4) for x in ratio["naive"]],
        "topk_bytes_per_token_k16": round(sizes["topk_k16"] / tokens, 2),
        "topk_bytes_per_token_k64": round(sizes["topk_k64"] / tokens, 2),
        "embed_bytes_per_doc": round(sizes[f"embed_k{ks[0]}"] / len(sub.ids), 1),
        "hidden_bytes_per_token_per_dim": round(sizes["hidden"] / (tokens * hidden_size), 4),
        "hidden_bytes_per_token_per_dim_fp8": round(sizes["hidden_fp8"] / (tokens * hidden_size), 4),
        **fp8_error,
        "naive_topk_bytes_per_token_k16": round(naive_sizes["topk_k16"] / tokens, 2),
        "naive_topk_bytes_per_token_k64": round(naive_sizes["topk_k64"] / tokens, 2),
        "naive_embed_bytes_per_doc": round(naive_sizes["embed"] / len(sub.ids), 1),
        "naive_hidden_bytes_per_token_per_dim": round(naive_sizes[f"hidden_l{layer}"] / (tokens * hidden_size), 4),
        "passes_per_token": round(kdflow_layers / (n_layers * forwards), 4),
        "passes_goal": round(1 + layer / n_layers, 4),
        "naive_passes_per_token": round(naive_counts[0] / (n_layers * len(batches)), 4),
        "layer_calls": {"topk": topk_layers, "hidden": counts["hidden"][0], "naive": naive_counts[0]},
        "forward_batches": forwards,
        "tokens": tokens,
        "documents": len(sub.ids),
        "batches": len(batches),
        "rounds": args.rounds,
        "batch_size": bs,
        "max_length": settings["max_length"],
        "k": k,
        "layer": layer,
        "rows_per_part": settings["rows_per_part"],
        "num_layers": n_layers,
        "hidden_size": hidden_size,
        "vocab_size": len(tokenizer),
        "torch_threads": torch.get_num_threads(),
        "dtype": settings["dtype"],
        "shard": str(shard),
        "teacher": info.name,
        "quick": bool(args.quick),
        "timing_s": round(timing_s, 1),
        "file_bytes": {
            **{f"kdflow_{n}": v for n, v in sizes.items()},
            **{f"naive_{n}": v for n, v in naive_sizes.items()},
        },
    }
    return result


def loader_docs_per_s(path: Path, pad_id: int, rounds: int = 5, batch: int = 4) -> float:
    """Documents/s of the training stream over one logit-cache file (decoding included) with collate into
    batches of ``batch``: the best of ``rounds`` epochs."""
    from kdflow.cache_loader import CacheStream, ShardCaches, collate

    best = 0.0
    for epoch in range(rounds):
        stream = CacheStream([ShardCaches(path)], seed=0, shuffle_buffer=16)
        stream.set_epoch(epoch)
        t0, docs, examples = time.perf_counter(), 0, []
        for example in stream:
            examples.append(example)
            if len(examples) == batch:
                collate(examples, pad_id)
                docs, examples = docs + batch, []
        best = max(best, docs / (time.perf_counter() - t0))
    return round(best, 1)


def fp8_against_fp16(fp16: Path, fp8: Path, layer: int) -> dict[str, float]:
    """How far the float8 hidden cache's decoded values are from the float16 cache's, position by position:
    relative L2 error ||h8 - h16|| / ||h16|| (mean and max) and the smallest cosine similarity."""
    column = f"hidden_l{layer}"
    a = {d["doc_index"]: d[column] for d in CacheReader.open(fp16, "hidden").iter_docs(["doc_index", column])}
    b = {d["doc_index"]: d[column] for d in CacheReader.open(fp8, "hidden").iter_docs(["doc_index", column])}
    ref = np.concatenate([a[i] for i in sorted(a)]).astype(np.float64)
    got = np.concatenate([b[i] for i in sorted(a)]).astype(np.float64)
    norm = np.linalg.norm(ref, axis=-1)
    live = norm > 0
    rel = np.linalg.norm(got - ref, axis=-1)[live] / norm[live]
    cos = (got * ref).sum(-1)[live] / (np.linalg.norm(got, axis=-1)[live] * norm[live])
    return {
        "hidden_fp8_rel_err_mean": round(float(rel.mean()), 5),
        "hidden_fp8_rel_err_max": round(float(rel.max()), 5),
        "hidden_fp8_cos_min": round(float(cos.min()), 6),
    }


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("tokens/s (median of rounds)", f"{r['capture_tokens_per_s']:.0f}", f"{r['naive_capture_tokens_per_s']:.0f}"),
        ("  ratio to bare forward", f"{r['capture_ratio']:.3f}", f"{r['naive_capture_ratio']:.3f}"),
        (
            "  per round",
            " ".join(f"{x:.3f}" for x in r["capture_ratio_rounds"]),
            " ".join(f"{x:.3f}" for x in r["naive_capture_ratio_rounds"]),
        ),
        ("  fastest round per batch", f"{r['capture_ratio_best']:.3f}", f"{r['naive_capture_ratio_best']:.3f}"),
        (
            "top-k bytes/token, k=16",
            f"{r['topk_bytes_per_token_k16']:.1f}",
            f"{r['naive_topk_bytes_per_token_k16']:.1f}",
        ),
        (
            "top-k bytes/token, k=64",
            f"{r['topk_bytes_per_token_k64']:.1f}",
            f"{r['naive_topk_bytes_per_token_k64']:.1f}",
        ),
        ("embed bytes/document", f"{r['embed_bytes_per_doc']:.0f}", f"{r['naive_embed_bytes_per_doc']:.0f}"),
        (
            f"hidden l{r['layer']} bytes/token/dim",
            f"{r['hidden_bytes_per_token_per_dim']:.3f}",
            f"{r['naive_hidden_bytes_per_token_per_dim']:.3f}",
        ),
        (f"hidden l{r['layer']} bytes/token/dim, float8", f"{r['hidden_bytes_per_token_per_dim_fp8']:.3f}", "-"),
        (
            "  float8 vs float16: rel. L2 error mean/max",
            f"{r['hidden_fp8_rel_err_mean']:.4f}/{r['hidden_fp8_rel_err_max']:.4f}",
            "-",
        ),
        (
            "passes/token (3 caches)",
            f"{r['passes_per_token']:.3f} (goal {r['passes_goal']:.3f})",
            f"{r['naive_passes_per_token']:.3f}",
        ),
    ]
    print(
        f"\nbare forward: {r['bare_tokens_per_s']:.0f} tok/s (rounds: "
        f"{', '.join(f'{x:.0f}' for x in r['bare_tokens_per_s_rounds'])}); {r['tokens']} tokens, "
        f"{r['batches']} batches x {r['batch_size']}, max_length {r['max_length']}, k={r['k']}, "
        f"{r['torch_threads']} threads"
    )
    width = max(len(a) for a, _, _ in rows)
    print(f"{'':{width}}  {'kdflow':>22}  {'naive':>12}")
    for a, b, c in rows:
        print(f"{a:{width}}  {b:>22}  {c:>12}")
    print()


if __name__ == "__main__":
    main()

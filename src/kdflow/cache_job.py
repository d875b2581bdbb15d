"""The resumable shard job under both teacher passes (kdflow.teacher_pass): the shard tokenised as the
teacher sees it, and its processing in parts.

Documents are tokenised once, sorted by length and batched, so little compute goes to padding. Every
``rows_per_part`` documents (in that sorted order) are written as a finished part file under
``results/cache/.partial/…``, outside the rule's declared output: a job killed or preempted midway
resumes from its finished parts; the declared output is assembled from them at the end, atomically.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from kdflow import __version__
from kdflow.cache_format import FORMAT_VERSION, CacheError, CacheMeta, PartWriter, assemble, read_meta
from kdflow.config import config_hash
from kdflow.manifest import ModelManifest
from kdflow.models import tokenizer_fingerprint
from kdflow.provenance import file_sha256, git_commit


@dataclass
class Tokenised:
    """A shard's documents as the teacher sees them, in shard order."""

    doc_ids: list[str]
    ids: list[np.ndarray]  # int32 token ids, truncated to max_length
    texts: list[str]  # the part of each document those tokens cover
    truncated: np.ndarray  # bool per document


def tokenise_shard(shard: str | Path, tokenizer, max_length: int) -> Tokenised:
    table = pq.read_table(shard, columns=["doc_id", "text"])
    doc_ids, texts = table.column("doc_id").to_pylist(), table.column("text").to_pylist()
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
    ids, covered, truncated = [], [], []
    for text, row, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=False):
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


@dataclass
class CacheJob:
    """What one cache job needs to know; ``meta`` goes into every file it writes."""

    kind: str  # "topk" (+ embed) or "hidden"
    shard: Path
    outputs: dict[str, Path]  # {"topk": …, "embed": …} or {"hidden": …}
    partial_dir: Path
    teacher_manifest: Path
    settings: dict[str, Any]  # config["teacher_cache"]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shard": str(self.shard),
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "partial_dir": str(self.partial_dir),
            "teacher_manifest": str(self.teacher_manifest),
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheJob:
        return cls(
            kind=data["kind"],
            shard=Path(data["shard"]),
            outputs={k: Path(v) for k, v in data["outputs"].items()},
            partial_dir=Path(data["partial_dir"]),
            teacher_manifest=Path(data["teacher_manifest"]),
            settings=dict(data["settings"]),
        )

    def base_meta(self, teacher: ModelManifest, tokenizer, n_layers: int, keys: Sequence[str]) -> dict[str, Any]:
        """The common fields of :class:`CacheMeta` for every file of this job (provenance, and the resume key a
        finished part must match to be reused: the settings, the teacher's weights and tokenizer, the shard's
        bytes); ``keys`` are the settings that change its content."""
        s = self.settings
        common = {
            "format_version": FORMAT_VERSION,
            "kdflow_version": __version__,
            "git_commit": git_commit(),
            "teacher": teacher.name,
            "teacher_source_hash": teacher.source_hash,
            "teacher_revision": teacher.revision,
            "teacher_layers": n_layers,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "max_length": s["max_length"],
            "dtype": s["dtype"],
            "value_dtype": "float16",
            "shard": self.shard.stem,
            "shard_sha256": file_sha256(self.shard),
            "settings_hash": config_hash({k: s[k] for k in ("max_length", "dtype", "rows_per_part", *keys)}),
        }
        resumed_by = (
            "settings_hash",
            "teacher_source_hash",
            "teacher_revision",
            "tokenizer_fingerprint",
            "shard_sha256",
        )
        return {**common, "resume_key": config_hash({k: common[k] for k in resumed_by})}


def _part_paths(job: CacheJob, names: Sequence[str], part: int) -> dict[str, Path]:
    return {n: job.partial_dir / f"{n}_part{part:05d}.parquet" for n in names}


def _finished(paths: dict[str, Path], meta: CacheMeta) -> bool:
    """A part counts as done when all its files exist and carry this job's resume key (same settings,
    teacher weights, tokenizer and shard bytes)."""
    try:
        return all(read_meta(p).resume_key == meta.resume_key for p in paths.values())
    except CacheError:  # missing, cut by a kill, or written by another kdflow
        return False


def rank_of_ranks() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) alone; a tensor-parallel cache job's rank otherwise
    (kdflow.teacher_parallel: the process group is initialised before the teacher loads)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _agreed(values: list[bool]) -> list[bool]:
    """Rank 0's ``values`` on every rank (alone: ``values``): all ranks must run the same parts, since each
    forward is a collective."""
    if rank_of_ranks()[1] == 1:
        return values
    box = [values]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_cache_job(
    job: CacheJob,
    metas: dict[str, CacheMeta],
    schemas: dict[str, Any],
    tok: Tokenised,
    make_part: Callable[[np.ndarray], dict[str, dict]],
    progress_desc: str,
) -> dict[str, Any] | None:
    """Process ``tok`` in length order, part by part, skipping finished parts; then assemble outputs.

    One rank of a tensor-parallel job (:func:`rank_of_ranks`): every rank runs ``make_part`` on the same parts
    (rank 0 decides which are finished); rank 0 alone writes parts and outputs and returns the summary; the
    other ranks return None."""
    s = job.settings
    rank, _ = rank_of_ranks()
    order = length_order(tok)
    rows = s["rows_per_part"]
    n_parts = max(1, -(-len(order) // rows))
    writers = {name: PartWriter(schemas[name]) for name in job.outputs}
    if rank == 0:
        job.partial_dir.mkdir(parents=True, exist_ok=True)
    t0, tokens_done, resumed = time.perf_counter(), 0, 0
    total_tokens = int(sum(len(x) for x in tok.ids))
    quiet = {"disable": True} if rank else {}  # one bar per job (TQDM_DISABLE still applies to rank 0's)
    bar = tqdm(total=total_tokens, desc=progress_desc, unit="tok", unit_scale=True, mininterval=1, **quiet)
    all_parts = [_part_paths(job, list(job.outputs), part) for part in range(n_parts)]
    first = next(iter(job.outputs))
    finished = _agreed([_finished(paths, metas[first]) if rank == 0 else False for paths in all_parts])
    for part, paths in enumerate(all_parts):
        index = order[part * rows : (part + 1) * rows]
        part_tokens = int(sum(len(tok.ids[i]) for i in index))
        if finished[part]:
            resumed += 1
            bar.update(part_tokens)
            continue
        columns = make_part(index)
        if rank == 0:
            for name in job.outputs:
                writers[name].write(paths[name], columns[name], metas[name])
        tokens_done += part_tokens
        bar.update(part_tokens)
        bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    if rank != 0:
        return None
    seconds = time.perf_counter() - t0
    sizes = {name: assemble([p[name] for p in all_parts], job.outputs[name], metas[name]) for name in job.outputs}
    shutil.rmtree(job.partial_dir, ignore_errors=True)
    summary = {
        "cache": job.kind,
        "shard": job.shard.stem,
        "documents": len(order),
        "tokens": total_tokens,
        "tokens_computed": tokens_done,
        "parts": n_parts,
        "parts_resumed": resumed,
        "truncated_documents": int(tok.truncated.sum()),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens_done / seconds, 1) if tokens_done else None,
        "bytes_written": sum(sizes.values()),
        "bytes": dict(sizes),
    }
    return summary

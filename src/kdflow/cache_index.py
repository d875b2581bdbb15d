"""One index file per teacher cache: the list of its training-shard files, checked to agree with each other.

A training run depends on the index (``results/cache/<teacher>/<cache>/index.json``), not on each shard's
file: with 2,048 shards a run would otherwise carry 6,144 inputs, which Snakemake checks, stats and prints
for every run. The index rule runs on the machine that runs Snakemake (it reads file footers only) and
refuses caches that were built by different teachers, tokenizers or settings, before any training starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from kdflow.atomic import write_json
from kdflow.cache_format import CacheMismatch, read_meta

log = logging.getLogger("kdflow.cache_index")

# What every file of one cache must share: who built it and how (per-shard keys such as shard_sha256 differ).
SHARED_KEYS = (
    "cache",
    "teacher",
    "teacher_source_hash",
    "teacher_revision",
    "tokenizer_fingerprint",
    "vocab_size",
    "k",
    "samples",  # (the optional keys only where a file has them: a sampled tail, the compact encoding)
    "sample_seed",
    "sampling",
    "logit_encoding",
    "logit_floor",
    "max_length",
    "dtype",
    "settings_hash",
    "layers",
    "hidden_size",
    "token_ratio",
    "token_seed",
)


def write_index(files: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Write the index of ``files`` (one cache, one file per training shard) to ``out`` and return it."""
    if not files:
        raise CacheMismatch(f"{out}: no cache files to index")
    entries, shared, first = [], None, None
    for f in map(Path, files):
        meta = read_meta(f)
        written = meta.to_json()
        mine = {k: written[k] for k in SHARED_KEYS if k in written}
        if shared is None:
            shared, first = mine, f
        elif mine != shared:
            key = next(k for k in sorted(set(mine) | set(shared)) if mine.get(k) != shared.get(k))
            raise CacheMismatch(
                f"{f}: built with {key}={mine.get(key)!r}, but {first} with {key}={shared.get(key)!r}; "
                f"one cache must come from one teacher and one setting: rebuild the odd file "
                f"(`snakemake --force {f}`)"
            )
        entries.append(
            {
                "path": str(f),
                "shard": meta.shard,
                "rows": pq.ParquetFile(f).metadata.num_rows,
                "shard_sha256": meta.shard_sha256,
            }
        )
    index = {"cache": shared["cache"], "meta": shared, "files": entries, "rows": sum(e["rows"] for e in entries)}
    write_json(out, index)
    log.info(
        "%s: %d files, %d rows (%s cache of %s)",
        out,
        len(entries),
        index["rows"],
        index["cache"],
        shared["teacher"],
    )
    return index


def index_files(index: str | Path) -> list[str]:
    """The cache files an index lists, in shard order."""
    data = json.loads(Path(index).read_text(encoding="utf-8"))
    return [e["path"] for e in data["files"]]

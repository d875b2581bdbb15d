"""Shard files: one Parquet file per training shard plus ``heldout``, sliced from the corpus.

Schema (zstd, one row group): ``doc_id`` string (``<source>/<locator>[@repeat][#piece]``), ``source``
string, ``text`` string. Key/value metadata: ``kdflow.shard`` (its name), ``kdflow.data_config_hash``
and ``kdflow.corpus_rows`` (documents in it). Written deterministically: the same corpus gives the
same bytes, so rebuilding one shard never changes what was derived from another.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdflow.atomic import atomic_path
from kdflow.corpus import CORPUS_SCHEMA, HELDOUT
from kdflow.errors import KdflowError

SHARD_PATTERN = r"shard_\d{5}|heldout"
SHARD_SCHEMA = pa.schema([f for f in CORPUS_SCHEMA if f.name != "shard"])


class ShardError(KdflowError, RuntimeError):
    pass


def shard_index(name: str) -> int:
    """``heldout`` -> -1, ``shard_00042`` -> 42."""
    if name == "heldout":
        return HELDOUT
    if not re.fullmatch(r"shard_\d{5}", name):
        raise ShardError(f"{name!r} is not a shard name (shard_NNNNN or heldout)")
    return int(name.split("_")[1])


def write_shard(corpus: str | Path, name: str, out: str | Path) -> int:
    """Write shard ``name`` of ``corpus`` to ``out`` (atomically); returns its number of documents."""
    index = shard_index(name)
    table = pq.read_table(corpus, filters=[("shard", "==", index)], columns=SHARD_SCHEMA.names)
    if table.num_rows == 0:
        raise ShardError(
            f"{corpus}: has no rows for {name}; is data.n_shards larger than when the corpus "
            f"was built? Rerun the corpus rule."
        )
    corpus_meta = pq.read_schema(corpus).metadata or {}
    meta = {
        b"kdflow.shard": name.encode(),
        b"kdflow.corpus_rows": str(table.num_rows).encode(),
        b"kdflow.data_config_hash": corpus_meta.get(b"kdflow.data_config_hash", b""),
    }
    table = table.cast(SHARD_SCHEMA).replace_schema_metadata(meta)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, table.num_rows))
    return table.num_rows


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return texts if limit is None else texts[:limit]

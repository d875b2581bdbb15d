"""The teacher caches on disk: schemas, writing from arrays, the one reader, and compatibility checks.

docs/cache_format.md documents the three formats for people; this module is their definition. Every
column is built from NumPy arrays (no per-value Python objects); per-token columns are Arrow lists
(one entry per document) of fixed-size lists (one entry per token position).

Alignment: in the top-k cache, position ``j`` of a document holds the teacher's distribution over the
token that *follows* ``input_ids[j]``: row j predicts token j+1. The last position predicts the token
after the cached text (it has no target inside the document).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
META_PREFIX = "kdflow."
LOGPROB_FLOOR = -1.0e4  # log-probabilities below this (incl. -inf) are stored as this: the cache's "zero mass"

# The metadata keys each cache kind carries besides ``cache`` (the kind itself), docs/cache_format.md
# "Key/value metadata": kdflow.teacher_pass writes exactly these, kdflow.cache_loader checks against them.
COMMON_META_KEYS = frozenset(
    {
        "format_version",
        "kdflow_version",
        "git_commit",
        "teacher",
        "teacher_source_hash",
        "teacher_revision",
        "teacher_layers",
        "tokenizer_fingerprint",
        "vocab_size",
        "max_length",
        "dtype",
        "value_dtype",
        "shard",
        "shard_sha256",
        "settings_hash",
        "resume_key",
    }
)
KIND_META_KEYS = {
    "topk": COMMON_META_KEYS | {"k"},
    "embed": COMMON_META_KEYS | {"hidden_size"},
    "hidden": COMMON_META_KEYS | {"layers", "hidden_size", "token_ratio", "token_seed"},
}


class CacheMismatch(ValueError):
    """A cache file asked for something it was not built with; names the file and both values."""


class CacheError(RuntimeError):
    """A cache file that is not a kdflow cache, or is damaged."""


# --------------------------------------------------------------------------- schemas


def topk_schema(k: int) -> pa.Schema:
    return pa.schema(
        [
            ("doc_index", pa.int32()),  # row of the source shard
            ("doc_id", pa.string()),
            ("n_tokens", pa.int32()),  # tokens the teacher saw (after truncation)
            ("truncated", pa.bool_()),  # the document was longer than max_length tokens
            ("input_ids", pa.list_(pa.int32())),  # [n_tokens]
            ("topk_ids", pa.list_(pa.list_(pa.int32(), k))),  # [n_tokens][k], most probable first
            ("topk_logprobs", pa.list_(pa.list_(pa.float16(), k))),  # full-vocabulary log p at T=1
            ("rest_logprob", pa.list_(pa.float16())),  # log of the probability mass outside the k ids
        ]
    )


def embed_schema(hidden: int) -> pa.Schema:
    return pa.schema(
        [
            ("doc_index", pa.int32()),
            ("doc_id", pa.string()),
            ("n_tokens", pa.int32()),
            ("text", pa.string()),  # the text the teacher saw (the document up to truncation)
            ("embedding", pa.list_(pa.float16(), hidden)),  # mean of the final hidden state over its tokens
        ]
    )


def hidden_schema(hidden: int, layers: Sequence[int]) -> pa.Schema:
    fields = [
        ("doc_index", pa.int32()),
        ("doc_id", pa.string()),
        ("n_tokens", pa.int32()),
        ("positions", pa.list_(pa.int32())),  # the token positions stored (all, or a seeded subset)
    ]
    fields += [(f"hidden_l{layer}", pa.list_(pa.list_(pa.float16(), hidden))) for layer in layers]
    return pa.schema(fields)


# --------------------------------------------------------------------------- arrays


def ragged(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType | None = None) -> pa.ListArray:
    """A list array whose i-th entry is the next ``lengths[i]`` rows of ``values``.

    ``values`` of shape [T] gives list<scalar>; of shape [T, d] gives list<fixed_size_list<scalar, d>>.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != len(values):
        raise ValueError(f"ragged: lengths sum to {offsets[-1]} but there are {len(values)} rows")
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=type_)
    inner = flat if values.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] -> fixed_size_list<scalar, d> of length n."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])


def list_values(column: pa.ChunkedArray | pa.Array, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`ragged`: (values [T] or [T, width], lengths [n]) as NumPy, without Python objects."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    inner = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    flat = (inner.flatten() if width is not None else inner).to_numpy(zero_copy_only=False)
    values = flat.reshape(-1, width) if width is not None else flat
    return values, np.diff(offsets)


# --------------------------------------------------------------------------- metadata


def split_expected(expected: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``expected`` split per kind: each kind gets the keys its files carry (``KIND_META_KEYS``); a key of
    ``expected`` is checked against every file whose kind carries it and ignored for the others; a key no
    kind carries (a typo, or ``cache``, which the kind decides) is refused."""
    expected = dict(expected or {})
    unknown = sorted(set(expected) - set().union(*KIND_META_KEYS.values()))
    if unknown:
        raise ValueError(
            f"CacheStream(expected=…): {unknown} is not a metadata key of any cache; known keys: "
            f"{sorted(set().union(*KIND_META_KEYS.values()))} (the kind, `cache`, is implied by the file)"
        )
    return {kind: {k: v for k, v in expected.items() if k in keys} for kind, keys in KIND_META_KEYS.items()}


def cache_meta(base: dict[str, Any], kind: str, **extra: Any) -> dict[str, Any]:
    """The metadata of a ``kind`` file: ``base`` (the common keys), the kind, and the kind's own keys.
    Refuses any key set other than ``KIND_META_KEYS[kind]``: what is written is what the loader checks."""
    meta = {**base, "cache": kind, **extra}
    if set(meta) - {"cache"} != KIND_META_KEYS[kind]:
        raise ValueError(
            f"{kind} cache metadata {sorted(meta)} is not cache_format.KIND_META_KEYS[{kind!r}] "
            f"{sorted(KIND_META_KEYS[kind])}; change both (and docs/cache_format.md) together"
        )
    return meta


def encode_meta(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {f"{META_PREFIX}{k}".encode(): json.dumps(v, sort_keys=True).encode() for k, v in meta.items()}


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``kdflow.*`` key/value metadata of a cache file, decoded."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise CacheError(
            f"{path}: not a readable Parquet file ({e}); rebuild it with `snakemake --force {path}`"
        ) from e
    try:
        meta = {
            k.decode()[len(META_PREFIX) :]: json.loads(v) for k, v in raw.items() if k.decode().startswith(META_PREFIX)
        }
    except ValueError:  # e.g. a shard file: kdflow.* keys, but plain strings, not a cache's JSON values
        meta = {}
    if "cache" not in meta:
        raise CacheError(f"{path}: has no kdflow cache metadata; it was not written by kdflow")
    return meta


def check_compatible(path: str | Path, meta: dict[str, Any], expected: dict[str, Any], asked_by: str) -> None:
    """Refuse a cache file built with other settings than ``expected`` (k, layers, tokenizer, shard …).

    The message names the file, the key, the value it was built with and the value asked for.
    """
    for key, want in expected.items():
        have = meta.get(key)
        if have != want and key == "cache":
            raise CacheMismatch(f"{path}: is a {have!r} cache, but {asked_by} needs a {want!r} cache; check the path")
        if have != want:
            raise CacheMismatch(
                f"{path}: built with {key}={have!r}, but {asked_by} needs {key}={want!r}; rebuild "
                f"the cache for this config (`snakemake --force {path}`) or fix the config"
            )


def check_student_vocab(meta: dict[str, Any], student: dict[str, Any], mode: str, path: str | Path) -> None:
    """Logit (rb) and feature (fb) KD need the student to read the teacher's token ids: refuse otherwise.

    ``student`` is the student's model manifest (``kdflow_model.json``); relation KD (relb) is exempt.
    """
    if mode not in ("rb", "fb"):
        return
    if student.get("tokenizer_fingerprint") != meta.get("tokenizer_fingerprint"):
        raise CacheMismatch(
            f"{path}: the teacher tokenizer (fingerprint {meta.get('tokenizer_fingerprint')}, vocab "
            f"{meta.get('vocab_size')}) differs from student {student.get('name')!r}'s (fingerprint "
            f"{student.get('tokenizer_fingerprint')}); {mode} KD needs the same token ids. Use relb for this student."
        )


# --------------------------------------------------------------------------- writing


@dataclass
class PartWriter:
    """Writes one part (a row group's worth of documents) of a cache as its own small file, atomically."""

    schema: pa.Schema

    def write(self, path: Path, columns: dict[str, pa.Array], meta: dict[str, Any]) -> int:
        from kdflow.atomic import atomic_path

        table = pa.table(columns, schema=self.schema.with_metadata(encode_meta(meta)))
        with atomic_path(path) as tmp:
            pq.write_table(
                table,
                tmp,
                compression="zstd",
                row_group_size=max(1, table.num_rows),
                use_dictionary=["doc_id"],
                write_statistics=["doc_index"],
            )
        return path.stat().st_size


def assemble(parts: Sequence[Path], out: Path, meta: dict[str, Any]) -> int:
    """Concatenate finished parts into ``out`` (one row group per part) atomically; returns its size."""
    from kdflow.atomic import atomic_path

    schema = pq.read_schema(parts[0]).with_metadata(encode_meta(meta))
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(
            tmp, schema, compression="zstd", use_dictionary=["doc_id"], write_statistics=["doc_index"]
        ) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part).replace_schema_metadata(schema.metadata))
    return out.stat().st_size


# --------------------------------------------------------------------------- reading


@dataclass
class CacheReader:
    """Streams a cache file row group by row group (never the whole file in memory)."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def open(
        cls, path: str | Path, kind: str, expected: dict[str, Any] | None = None, asked_by: str = "the caller"
    ) -> CacheReader:
        path = Path(path)
        meta = read_meta(path)
        check_compatible(path, meta, {"cache": kind, **(expected or {})}, asked_by)
        return cls(path, meta)

    @property
    def num_rows(self) -> int:
        return pq.ParquetFile(self.path).metadata.num_rows

    def iter_tables(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(self.path)
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i, columns=list(columns) if columns else None)

    def iter_docs(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """One dict per document: scalars as Python values, per-token columns as NumPy arrays."""
        for table in self.iter_tables(columns):
            decoded: dict[str, Any] = {}
            for name in table.column_names:
                col = table.column(name)
                if pa.types.is_list(col.type):
                    width = col.type.value_type.list_size if pa.types.is_fixed_size_list(col.type.value_type) else None
                    values, lengths = list_values(col, width)
                    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                    decoded[name] = [values[s : s + n] for s, n in zip(starts, lengths, strict=False)]
                elif pa.types.is_fixed_size_list(col.type):
                    decoded[name] = list(
                        col.combine_chunks()
                        .flatten()
                        .to_numpy(zero_copy_only=False)
                        .reshape(len(col), col.type.list_size)
                    )
                else:
                    decoded[name] = col.to_pylist()
            for i in range(table.num_rows):
                yield {name: values[i] for name, values in decoded.items()}

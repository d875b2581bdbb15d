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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdflow.cache_columns import LOGPROB_FLOOR, fixed, list_values, ragged  # noqa: F401  (re-exported)
from kdflow.cache_compact import COMPACT, decode_compact_columns
from kdflow.cache_fp8 import FP8, decode_fp8_columns
from kdflow.cache_schemas import HIDDEN_DTYPES, embed_schema, hidden_schema, topk_schema  # noqa: F401  (re-exported)
from kdflow.errors import KdflowError
from kdflow.json_types import dataclass_problems

if TYPE_CHECKING:
    from kdflow.manifest import ModelManifest

FORMAT_VERSION = 1
META_PREFIX = "kdflow."

# The metadata keys of each cache kind besides the common ones and ``cache`` (the kind itself), in the order they
# are written (docs/cache_format.md "Key/value metadata"); the common keys are the fields of :class:`CacheMeta`
# before ``cache`` (COMMON_KEYS, below it).
KIND_KEYS = {
    "topk": ("k", "samples", "sample_seed", "sampling", "logit_encoding", "logit_floor"),
    "embed": ("hidden_size",),
    "hidden": ("layers", "hidden_size", "token_ratio", "token_seed"),
}
# Kind keys that a file may leave out: a top-k cache without a sampled tail (samples: 0), in the plain encoding, is
# written as before the tail and the compact encoding existed (its bytes and settings hash unchanged); a tail of
# independent draws has no ``sampling`` key (as before systematic draws existed).
OPTIONAL_KEYS = {"samples", "sample_seed", "sampling", "logit_encoding", "logit_floor"}


class CacheMismatch(KdflowError, ValueError):
    """A cache file asked for something it was not built with; names the file and both values."""


class CacheError(KdflowError, RuntimeError):
    """A cache file that is not a kdflow cache, or is damaged."""


class CacheMetaError(KdflowError, ValueError):
    """Cache metadata that breaks the contract (:class:`CacheMeta`); the message lists every fault."""


@dataclass(frozen=True, kw_only=True)
class CacheMeta:
    """The ``kdflow.*`` key/value metadata of one cache file (docs/cache_format.md): who built it, from which
    shard, with which settings. The common fields are in every file; ``cache`` (the kind) decides which of the
    kind fields are set (``KIND_KEYS``): the others are None and absent from the file. Checked when made."""

    format_version: int  # FORMAT_VERSION: the only one this code reads
    kdflow_version: str
    git_commit: str
    teacher: str  # the teacher's name
    teacher_source_hash: str  # its manifest's source_hash
    teacher_revision: str | None  # its manifest's revision
    teacher_layers: int  # its decoder layers
    tokenizer_fingerprint: str  # of the teacher's tokenizer: the token ids the file holds
    vocab_size: int  # len(teacher tokenizer)
    max_length: int  # tokens per document the teacher saw
    dtype: str  # the teacher's compute dtype
    value_dtype: str  # of the stored values (float16)
    shard: str  # the shard's name (shard_00000, heldout)
    shard_sha256: str  # the shard file's bytes
    settings_hash: str  # of the teacher_cache settings that change the content
    resume_key: str  # what a finished part must carry to be reused
    cache: str  # the kind: topk | embed | hidden
    k: int | None = None  # topk: ids per position (the exact head; 0 with a sampled tail only)
    samples: int | None = None  # topk: draws per position from the teacher outside the head (None: none)
    sample_seed: int | None = None  # topk: the seed of those draws, with the document and the position
    sampling: str | None = None  # topk: "systematic" (evenly spaced draws); None: independent (multinomial) draws
    logit_encoding: str | None = None  # topk: "compact" (kdflow.cache_compact); None: plain (float16, int32)
    logit_floor: float | None = None  # topk, compact: head entries below this probability moved into the rest
    hidden_size: int | None = None  # embed, hidden: the teacher's width
    layers: tuple[int, ...] | None = None  # hidden: the hidden states stored (transformers' numbering)
    token_ratio: float | None = None  # hidden: the fraction of positions stored
    token_seed: int | None = None  # hidden: the seed of that subset

    def __post_init__(self) -> None:
        if not isinstance(self.cache, str) or self.cache not in KIND_KEYS:
            raise CacheMetaError(f"cache = {self.cache!r} is none of {list(KIND_KEYS)}")
        problems = dataclass_problems(self)
        others = sorted({k for keys in KIND_KEYS.values() for k in keys} - set(KIND_KEYS[self.cache]))
        if missing := [k for k in KIND_KEYS[self.cache] if getattr(self, k) is None and k not in OPTIONAL_KEYS]:
            problems.append(f"a {self.cache} cache needs {missing}")
        if self.cache == "topk":
            problems += _logit_problems(self)
        if foreign := [k for k in others if getattr(self, k) is not None]:
            problems.append(f"a {self.cache} cache has no {foreign}")
        if not problems and self.format_version != FORMAT_VERSION:
            problems.append(f"format_version {self.format_version}: this kdflow reads format {FORMAT_VERSION} only")
        if problems:
            raise CacheMetaError("; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """The metadata as written: the common keys, ``cache``, then the kind's keys (in ``KIND_KEYS`` order)."""
        keys = [
            k
            for k in (*COMMON_KEYS, "cache", *KIND_KEYS[self.cache])
            if getattr(self, k) is not None or k not in OPTIONAL_KEYS
        ]
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in keys}

    @classmethod
    def from_json(cls, data: Any, path: str | Path | None = None) -> CacheMeta:
        """The metadata of the decoded ``kdflow.*`` keys ``data``; :class:`CacheMetaError` names the file
        (``path``) and every missing, unknown or wrong key."""
        at = f"{path}: " if path is not None else ""
        if not isinstance(data, dict):
            raise CacheMetaError(f"{at}expected a mapping, got {data!r}")
        kind = data.get("cache")
        if not isinstance(kind, str) or kind not in KIND_KEYS:
            raise CacheMetaError(f"{at}cache = {kind!r} is none of {list(KIND_KEYS)}")
        keys = (*COMMON_KEYS, "cache", *KIND_KEYS[kind])
        unknown, missing = sorted(set(data) - set(keys)), [k for k in keys if k not in data and k not in OPTIONAL_KEYS]
        if unknown or missing:
            listed = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
            raise CacheMetaError(f"{at}{kind} cache metadata: " + "; ".join(listed))
        values = {k: tuple(v) if k == "layers" and isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values)
        except CacheMetaError as e:
            raise CacheMetaError(f"{at}{e}") from None


def _logit_problems(meta: CacheMeta) -> list[str]:
    """What a logit cache's optional keys must satisfy: a tail has both keys and at least one draw; the compact
    encoding names itself and its floor."""
    problems = []
    if (meta.samples is None) != (meta.sample_seed is None):
        problems.append("a topk cache with a sampled tail needs both samples and sample_seed")
    elif meta.samples is not None and not (type(meta.samples) is int and meta.samples > 0):
        problems.append(f"samples = {meta.samples!r}: a sampled tail has at least one draw (no tail: no key)")
    if meta.sampling is not None and (meta.samples is None or meta.sampling != "systematic"):
        problems.append(
            f"sampling = {meta.sampling!r}: the key is 'systematic' on a file with a sampled tail, or absent "
            "(independent draws)"
        )
    if (meta.logit_encoding is None) != (meta.logit_floor is None) or meta.logit_encoding not in (None, COMPACT):
        problems.append(
            f"logit_encoding = {meta.logit_encoding!r}, logit_floor = {meta.logit_floor!r}: the compact encoding "
            f"has both ({COMPACT!r} and its floor); the plain one neither"
        )
    return problems


META_FIELDS = tuple(f.name for f in fields(CacheMeta))
COMMON_KEYS = META_FIELDS[: META_FIELDS.index("cache")]
COMMON_META_KEYS = frozenset(COMMON_KEYS)
KIND_META_KEYS = {kind: COMMON_META_KEYS | set(keys) for kind, keys in KIND_KEYS.items()}


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


def encode_meta(meta: CacheMeta) -> dict[bytes, bytes]:
    """The Parquet key/value metadata of ``meta``: ``kdflow.<key>`` -> the value as JSON."""
    return {f"{META_PREFIX}{k}".encode(): json.dumps(v, sort_keys=True).encode() for k, v in meta.to_json().items()}


def read_meta(path: str | Path) -> CacheMeta:
    """The ``kdflow.*`` key/value metadata of a cache file, decoded and checked."""
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
    try:
        return CacheMeta.from_json(meta, path)
    except CacheMetaError as e:
        raise CacheError(f"{e}; rebuild it with `snakemake --force {path}`") from None


def check_compatible(path: str | Path, meta: CacheMeta, expected: dict[str, Any], asked_by: str) -> None:
    """Refuse a cache file built with other settings than ``expected`` (field name -> value: k, layers,
    tokenizer, shard …; a list is compared as the file writes it). A field of another kind is None here.

    The message names the file, the key, the value it was built with and the value asked for.
    """
    unknown = sorted(set(expected) - set(META_FIELDS))
    if unknown:
        raise ValueError(f"{asked_by}: {unknown} is not a cache metadata key; known keys: {sorted(META_FIELDS)}")
    written = meta.to_json()
    for key, want in expected.items():
        have = written.get(key)
        if have != want and key == "cache":
            raise CacheMismatch(f"{path}: is a {have!r} cache, but {asked_by} needs a {want!r} cache; check the path")
        if have != want:
            raise CacheMismatch(
                f"{path}: built with {key}={have!r}, but {asked_by} needs {key}={want!r}; rebuild "
                f"the cache for this config (`snakemake --force {path}`) or fix the config"
            )


def check_student_vocab(meta: CacheMeta, student: ModelManifest, mode: str, path: str | Path) -> None:
    """Logit (rb) and feature (fb) KD need the student to read the teacher's token ids: refuse otherwise.

    ``student`` is the student's model manifest (``kdflow_model.json``); relation KD (relb) is exempt.
    """
    if mode not in ("rb", "fb"):
        return
    if student.tokenizer_fingerprint != meta.tokenizer_fingerprint:
        raise CacheMismatch(
            f"{path}: the teacher tokenizer (fingerprint {meta.tokenizer_fingerprint}, vocab "
            f"{meta.vocab_size}) differs from student {student.name!r}'s (fingerprint "
            f"{student.tokenizer_fingerprint}); {mode} KD needs the same token ids. Use relb for this student."
        )


# --------------------------------------------------------------------------- writing


@dataclass
class PartWriter:
    """Writes one part (a row group's worth of documents) of a cache as its own small file, atomically."""

    schema: pa.Schema

    def write(self, path: Path, columns: dict[str, pa.Array], meta: CacheMeta) -> int:
        from kdflow.atomic import atomic_path

        table = pa.table(columns, schema=self.schema.with_metadata(encode_meta(meta)))
        with atomic_path(path) as tmp:
            pq.write_table(
                table,
                tmp,
                compression="zstd",
                row_group_size=max(1, table.num_rows),
                use_dictionary=dictionary_columns(self.schema),
                write_statistics=["doc_index"],
            )
        return path.stat().st_size


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns written with dictionary encoding: ``doc_id``, and every column of unsigned integer values (the
    compact encoding's head ids and codes, the sample counts: few distinct values, which the dictionary's
    run-length indices store in a fraction of zstd's bytes alone) except the sampled ids, which it made larger on
    the logit study's caches (docs/study_logits.md). Parquet names a nested column by its leaf's path."""
    names = ["doc_id"]
    for f in schema:
        path, t = f.name, f.type
        while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
            path, t = f"{path}.list.element", t.value_type
        if pa.types.is_unsigned_integer(t) and f.name != "sample_ids":
            names.append(path)
    return names


def assemble(parts: Sequence[Path], out: Path, meta: CacheMeta) -> int:
    """Concatenate finished parts into ``out`` (one row group per part) atomically; returns its size."""
    from kdflow.atomic import atomic_path

    schema = pq.read_schema(parts[0]).with_metadata(encode_meta(meta))
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(
            tmp, schema, compression="zstd", use_dictionary=dictionary_columns(schema), write_statistics=["doc_index"]
        ) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part).replace_schema_metadata(schema.metadata))
    return out.stat().st_size


# --------------------------------------------------------------------------- reading


@dataclass
class CacheReader:
    """Streams a cache file row group by row group (never the whole file in memory)."""

    path: Path
    meta: CacheMeta

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
        """One dict per document: scalars as Python values, per-token columns as NumPy arrays (a sampled tail's: an
        array of per-position arrays). A float8 hidden state comes decoded (float16 [p, D], as a float16 cache's),
        its scales not as columns of their own; a compact logit cache's ids int32, its log-probs float32."""
        fp8 = self.meta.value_dtype == FP8
        if fp8 and columns:
            columns = list(columns) + [f"{c}_scale" for c in columns if c.startswith("hidden_l")]
        for table in self.iter_tables(columns):
            if fp8:
                table = decode_fp8_columns(table)
            if self.meta.logit_encoding == COMPACT:  # decoded to int32 ids and float32 log-probs
                table = decode_compact_columns(table)
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

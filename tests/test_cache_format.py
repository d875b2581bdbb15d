"""The teacher cache formats: ragged arrays, exact write/read round trips, metadata and compatibility checks."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdflow.cache_format import (
    KIND_META_KEYS,
    CacheError,
    CacheMeta,
    CacheMetaError,
    CacheMismatch,
    CacheReader,
    PartWriter,
    assemble,
    check_compatible,
    check_student_vocab,
    embed_schema,
    fixed,
    hidden_schema,
    list_values,
    ragged,
    read_meta,
    topk_schema,
)
from kdflow.manifest import ModelManifest, StudentOrigin

K = 4
COMMON = dict(
    format_version=1,
    kdflow_version="0.1.0",
    git_commit="abc",
    teacher="teacher",
    teacher_source_hash="src0",
    teacher_revision=None,
    teacher_layers=4,
    tokenizer_fingerprint="abc123",
    vocab_size=1000,
    max_length=16,
    dtype="float32",
    value_dtype="float16",
    shard="shard_003",
    shard_sha256="sha",
    settings_hash="s",
    resume_key="r",
)
META = CacheMeta(**COMMON, cache="topk", k=K)


def _f16(rng: np.random.Generator, shape) -> np.ndarray:
    """Random float16 values, with signed zeros, subnormals, extremes and infinities mixed in."""
    values = (rng.standard_normal(shape) * 8).astype(np.float16)
    flat = values.reshape(-1)
    specials = np.array([0.0, -0.0, 6e-8, -6e-8, 65504, -65504, np.inf, -np.inf], dtype=np.float16)
    flat[: min(len(flat), len(specials))] = specials[: len(flat)]
    return values


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality, dtype included (float16 compared as its bit pattern)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == np.float16:
        return np.array_equal(a.view(np.uint16), b.view(np.uint16))
    return np.array_equal(a, b)


def _topk_part(rng: np.random.Generator, doc_index: list[int], lengths: list[int], k: int = K):
    """Columns for :class:`PartWriter` and the per-document arrays they were made from."""
    lengths_a = np.asarray(lengths, dtype=np.int32)
    docs = []
    for i, n in zip(doc_index, lengths, strict=False):
        docs.append(
            {
                "doc_index": i,
                "doc_id": f"doc-{i}",
                "n_tokens": n,
                "truncated": bool(i % 2),
                "input_ids": rng.integers(0, 50_000, n).astype(np.int32),
                "topk_ids": rng.integers(0, 50_000, (n, k)).astype(np.int32),
                "topk_logprobs": _f16(rng, (n, k)),
                "rest_logprob": _f16(rng, (n,)),
            }
        )
    cat = lambda name, shape: np.concatenate([d[name] for d in docs]) if docs else np.empty(shape)  # noqa: E731
    columns = {
        "doc_index": np.asarray(doc_index, dtype=np.int32),
        "doc_id": [d["doc_id"] for d in docs],
        "n_tokens": lengths_a,
        "truncated": np.asarray([d["truncated"] for d in docs], dtype=bool),
        "input_ids": ragged(cat("input_ids", 0), lengths_a),
        "topk_ids": ragged(cat("topk_ids", (0, k)), lengths_a),
        "topk_logprobs": ragged(cat("topk_logprobs", (0, k)), lengths_a),
        "rest_logprob": ragged(cat("rest_logprob", 0), lengths_a),
    }
    return columns, docs


@pytest.fixture(scope="module")
def topk_file(tmp_path_factory):
    """A top-k cache assembled from two parts (one with a zero-length document); and the original arrays."""
    tmp = tmp_path_factory.mktemp("cachefmt")
    rng = np.random.default_rng(123)
    writer = PartWriter(topk_schema(K))
    parts, originals = [], []
    for part, (doc_index, lengths) in enumerate([([7, 2, 9], [5, 0, 11]), ([4, 0], [3, 8])]):
        columns, docs = _topk_part(rng, doc_index, lengths)
        path = tmp / f"topk_part{part:05d}.parquet"
        size = writer.write(path, columns, replace(META, resume_key=f"part{part}"))
        assert size == path.stat().st_size > 0
        parts.append(path)
        originals += docs
    out = tmp / "out" / "topk.parquet"
    size = assemble(parts, out, META)
    assert size == out.stat().st_size
    return out, originals


# --------------------------------------------------------------------------- ragged arrays


@pytest.mark.parametrize("width", [None, 3])
@pytest.mark.parametrize("lengths", [[4, 0, 2, 1], [0, 0], [], [5]])
def test_ragged_list_values_round_trip(width, lengths):
    rng = np.random.default_rng(0)
    total = sum(lengths)
    shape = (total,) if width is None else (total, width)
    values = rng.standard_normal(shape).astype(np.float16)
    arr = ragged(values, np.asarray(lengths, dtype=np.int32))
    assert len(arr) == len(lengths)
    # each entry is the next lengths[i] rows
    start = 0
    for i, n in enumerate(lengths):
        entry = arr[i].as_py()
        assert len(entry) == n
        want = values[start : start + n].tolist()
        assert entry == want
        start += n
    back, back_lengths = list_values(arr, width)
    assert _same_bits(back, values)
    assert back_lengths.tolist() == list(lengths)
    # the same through a multi-chunk ChunkedArray (as pq.read_table may return) and a slice
    chunked = pa.chunked_array([arr, arr], type=arr.type)
    back2, lengths2 = list_values(chunked, width)
    assert _same_bits(back2, np.concatenate([values, values]))
    assert lengths2.tolist() == list(lengths) * 2
    if len(lengths) > 1:
        back3, lengths3 = list_values(arr.slice(1), width)
        assert _same_bits(back3, values[lengths[0] :])
        assert lengths3.tolist() == list(lengths[1:])


def test_ragged_keeps_integer_dtype_and_fixed_width():
    ids = np.arange(12, dtype=np.int32).reshape(6, 2)
    arr = ragged(ids, np.array([2, 4]))
    assert arr.type == pa.list_(pa.list_(pa.int32(), 2))
    back, lengths = list_values(arr, 2)
    assert back.dtype == np.int32 and np.array_equal(back, ids) and lengths.tolist() == [2, 4]
    one_d = ragged(ids[:, 0], np.array([1, 5]))
    assert one_d.type == pa.list_(pa.int32())
    emb = fixed(np.ones((3, 5), dtype=np.float16))
    assert emb.type == pa.list_(pa.float16(), 5) and len(emb) == 3


@pytest.mark.parametrize("lengths", [[2, 2], [4, 2], [], [6], [0, 0, 0]])
def test_ragged_lengths_values_mismatch_raises(lengths):
    values = np.zeros((5, 3), dtype=np.float16)
    with pytest.raises(ValueError, match="5 rows"):
        ragged(values, np.asarray(lengths, dtype=np.int32))
    with pytest.raises(ValueError):
        ragged(values[:, 0], np.asarray(lengths, dtype=np.int32))


# --------------------------------------------------------------------------- write -> read


def test_topk_write_assemble_read_is_bit_exact(topk_file):
    out, originals = topk_file
    reader = CacheReader.open(out, "topk", expected={"k": K})
    assert reader.num_rows == len(originals) == 5
    docs = list(reader.iter_docs())
    assert len(docs) == len(originals)
    for got, want in zip(docs, originals, strict=False):
        assert got["doc_index"] == want["doc_index"] and got["doc_id"] == want["doc_id"]
        assert got["n_tokens"] == want["n_tokens"] and got["truncated"] is want["truncated"]
        for name in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob"):
            assert _same_bits(got[name], want[name]), (want["doc_index"], name)
        assert got["input_ids"].dtype == np.int32 and got["topk_ids"].dtype == np.int32
        assert got["topk_logprobs"].dtype == np.float16 and got["rest_logprob"].dtype == np.float16
        assert got["topk_ids"].shape == (want["n_tokens"], K)
    # the zero-length document survives as empty arrays of the right shape
    empty = next(d for d in docs if d["n_tokens"] == 0)
    assert empty["topk_ids"].shape == (0, K) and empty["rest_logprob"].shape == (0,)


def test_assembled_file_keeps_metadata_schema_and_one_row_group_per_part(topk_file):
    out, _ = topk_file
    assert read_meta(out) == META  # the assembled file carries the given metadata, not its parts' (resume keys)
    assert CacheReader.open(out, "topk").meta == META
    pf = pq.ParquetFile(out)
    assert pf.num_row_groups == 2
    assert [pf.metadata.row_group(i).num_rows for i in range(2)] == [3, 2]
    assert pf.schema_arrow.remove_metadata().equals(topk_schema(K))


def test_iter_docs_column_subset(topk_file):
    out, originals = topk_file
    docs = list(CacheReader.open(out, "topk").iter_docs(["doc_id", "rest_logprob"]))
    assert [set(d) for d in docs] == [{"doc_id", "rest_logprob"}] * len(originals)
    assert all(_same_bits(d["rest_logprob"], o["rest_logprob"]) for d, o in zip(docs, originals, strict=False))


def test_iter_tables_streams_one_row_group_at_a_time(topk_file):
    out, _ = topk_file
    tables = CacheReader.open(out, "topk").iter_tables(["doc_index"])
    assert not isinstance(tables, (list, tuple))  # a generator, not the file read at once
    sizes = [t.num_rows for t in tables]
    assert sizes == [3, 2]


def test_embed_and_hidden_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((3, 6)).astype(np.float16)
    path = tmp_path / "embed.parquet"
    PartWriter(embed_schema(6)).write(
        path,
        {
            "doc_index": np.arange(3, dtype=np.int32),
            "doc_id": ["a", "b", "c"],
            "n_tokens": np.array([2, 0, 5], dtype=np.int32),
            "text": ["xy", "", "hello"],
            "embedding": fixed(emb),
        },
        CacheMeta(**COMMON, cache="embed", hidden_size=6),
    )
    docs = list(CacheReader.open(path, "embed").iter_docs())
    assert [d["text"] for d in docs] == ["xy", "", "hello"]
    assert all(_same_bits(d["embedding"], emb[i]) for i, d in enumerate(docs))

    layers = [0, 3]
    lengths = np.array([2, 0, 3], dtype=np.int32)
    hid = {layer: rng.standard_normal((5, 6)).astype(np.float16) for layer in layers}
    pos = np.array([0, 1, 0, 2, 4], dtype=np.int32)
    cols = {
        "doc_index": np.arange(3, dtype=np.int32),
        "doc_id": ["a", "b", "c"],
        "n_tokens": np.array([2, 0, 5], np.int32),
        "positions": ragged(pos, lengths),
        **{f"hidden_l{layer}": ragged(hid[layer], lengths) for layer in layers},
    }
    path = tmp_path / "hidden.parquet"
    meta = CacheMeta(**COMMON, cache="hidden", layers=tuple(layers), hidden_size=6, token_ratio=1, token_seed=0)
    PartWriter(hidden_schema(6, layers)).write(path, cols, meta)
    assert read_meta(path) == meta and read_meta(path).to_json()["layers"] == layers
    docs = list(CacheReader.open(path, "hidden", expected={"layers": layers}).iter_docs())
    starts = [0, 2, 2]
    for d, s, n in zip(docs, starts, lengths, strict=False):
        assert _same_bits(d["positions"], pos[s : s + n])
        for layer in layers:
            assert _same_bits(d[f"hidden_l{layer}"], hid[layer][s : s + n])


# --------------------------------------------------------------------------- compatibility


@pytest.mark.parametrize(
    "key, want",
    [
        ("k", 8),
        ("layers", [2, 3]),
        ("tokenizer_fingerprint", "fff999"),
        ("shard", "shard_004"),
    ],
)
def test_open_refuses_other_settings_naming_file_key_and_both_values(topk_file, key, want):
    out, _ = topk_file
    with pytest.raises(CacheMismatch) as err:
        CacheReader.open(out, "topk", expected={key: want}, asked_by="student s1")
    text = str(err.value)
    assert str(out) in text and key in text
    assert repr(META.to_json().get(key)) in text and repr(want) in text
    assert "student s1" in text


def test_open_refuses_another_cache_kind(topk_file):
    out, _ = topk_file
    with pytest.raises(CacheMismatch) as err:
        CacheReader.open(out, "hidden")
    text = str(err.value)
    assert str(out) in text and "cache" in text and "'topk'" in text and "'hidden'" in text


def test_check_compatible_accepts_matching_and_reports_missing_key(tmp_path):
    check_compatible(tmp_path / "x.parquet", META, {"k": K, "teacher_revision": None, "cache": "topk"}, "me")
    with pytest.raises(CacheMismatch, match=r"layers=None.*layers=\[2, 4\]"):
        check_compatible(tmp_path / "x.parquet", META, {"layers": [2, 4]}, "me")  # a key of another kind
    with pytest.raises(ValueError, match=r"me: \['kk'\] is not a cache metadata key"):
        check_compatible(tmp_path / "x.parquet", META, {"kk": 1}, "me")
    assert issubclass(CacheMismatch, ValueError)


def _student(name: str, fingerprint: str) -> ModelManifest:
    shares = fingerprint == META.tokenizer_fingerprint
    return ModelManifest(
        name=name,
        role="student",
        source={"kind": "hf", "path": f"/models/{name}"},
        student_of=StudentOrigin(
            teacher="teacher",
            teacher_manifest="models/teacher/kdflow_model.json",
            teacher_heldout=None,
            shares_teacher_vocab=shares,
            vocab_mismatch=None if shares else "the tokenizers differ",
        ),
        origin="local_dir",
        load_path=f"/models/{name}",
        revision=None,
        source_hash="h",
        source_hash_of="config.json + file names, sizes and mtimes",
        tokenizer_fingerprint=fingerprint,
        tokenizer_size=1000,
        heldout=None,
        config_hash="c",
        provenance={},
    )


STUDENT_OTHER = _student("qwenish", "zzz")
STUDENT_SAME = _student("pruned", META.tokenizer_fingerprint)


@pytest.mark.parametrize("mode", ["rb", "fb"])
def test_student_with_other_tokenizer_refused_for_logit_and_feature_kd(mode):
    with pytest.raises(CacheMismatch) as err:
        check_student_vocab(META, STUDENT_OTHER, mode, "cache/topk/shard_003.parquet")
    text = str(err.value)
    assert "qwenish" in text and "relb" in text and "cache/topk/shard_003.parquet" in text and mode in text


@pytest.mark.parametrize(
    "mode, student", [("relb", STUDENT_OTHER), ("rb", STUDENT_SAME), ("fb", STUDENT_SAME), ("relb", STUDENT_SAME)]
)
def test_student_vocab_allowed(mode, student):
    check_student_vocab(META, student, mode, "x.parquet")


# --------------------------------------------------------------------------- not a cache


def test_read_meta_on_non_parquet_file(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("this is not parquet\n")
    with pytest.raises(CacheError, match="notes.parquet"):
        read_meta(path)
    with pytest.raises(CacheError, match="missing.parquet"):
        read_meta(tmp_path / "missing.parquet")
    with pytest.raises(CacheError):
        CacheReader.open(path, "topk")


def test_read_meta_on_parquet_without_kdflow_metadata(tmp_path):
    path = tmp_path / "plain.parquet"
    table = pa.table({"a": [1, 2]}).replace_schema_metadata({b"other.key": b'"x"'})
    pq.write_table(table, path)
    with pytest.raises(CacheError) as err:
        read_meta(path)
    assert str(path) in str(err.value) and "kdflow" in str(err.value)


def test_a_shard_file_is_not_a_cache(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdflow.cache_format import CacheError, read_meta

    shard = tmp_path / "shard_00000.parquet"
    table = pa.table({"doc_id": ["a"], "source": ["s"], "text": ["x"]})
    pq.write_table(table.replace_schema_metadata({b"kdflow.shard": b"shard_00000"}), shard)
    with pytest.raises(CacheError, match="no kdflow cache metadata"):
        read_meta(shard)


def test_cache_meta_takes_exactly_the_fields_of_its_kind():
    from kdflow.cache_format import KIND_KEYS, META_FIELDS

    assert set(META_FIELDS[META_FIELDS.index("cache") + 1 :]) == {k for keys in KIND_KEYS.values() for k in keys}
    meta = CacheMeta(**COMMON, cache="embed", hidden_size=8)
    assert (
        list(meta.to_json())[-2:] == ["cache", "hidden_size"]
        and set(meta.to_json()) - {"cache"} == KIND_META_KEYS["embed"]
    )
    with pytest.raises(CacheMetaError, match=r"a topk cache needs \['k'\]; a topk cache has no \['hidden_size'\]"):
        CacheMeta(**COMMON, cache="topk", hidden_size=8)  # a top-k file carries k, not hidden_size
    with pytest.raises(CacheMetaError, match="k = '4' is not int"):
        CacheMeta(**COMMON, cache="topk", k="4")
    with pytest.raises(CacheMetaError, match="format_version 2: this kdflow reads format 1 only"):
        CacheMeta(**dict(COMMON, format_version=2), cache="topk", k=4)
    with pytest.raises(CacheMetaError, match="cache = 'logits' is none of"):
        CacheMeta(**COMMON, cache="logits")


def test_metadata_with_missing_or_unknown_keys_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "odd.parquet"
    written = {**META.to_json(), "extra": 1}
    del written["shard_sha256"]
    table = pa.table({"a": [1]}).replace_schema_metadata(
        {f"kdflow.{k}".encode(): json.dumps(v).encode() for k, v in written.items()}
    )
    pq.write_table(table, path)
    with pytest.raises(CacheError) as err:
        read_meta(path)
    text = str(err.value)
    assert str(path) in text and "unknown keys ['extra']" in text and "missing keys ['shard_sha256']" in text
    assert "snakemake --force" in text
    assert CacheMeta.from_json(META.to_json()) == META


def test_float8_encoding_rounds_each_value_within_e4m3s_step_at_its_positions_scale():
    import torch

    from kdflow.cache_fp8 import E4M3_MAX, fp8_decode, fp8_encode

    g = torch.Generator().manual_seed(0)
    # positions of very different magnitudes (one with an outlier 300x its others, one of zeros, one tiny)
    x = torch.randn(6, 64, generator=g)
    x[1] *= 1000
    x[2, 5] = 300.0
    x[3] = 0.0
    x[4] *= 1e-3
    codes, scale = fp8_encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (6, 64) and scale.dtype == np.float32 and scale.shape == (6,)
    assert scale[3] == 0 and np.all(codes[3] == 0)
    assert not np.isin(codes, [0x7F, 0xFF]).any()  # e4m3's NaN codes are never written
    back = fp8_decode(codes, scale).astype(np.float32)
    want = x.numpy()
    amax = np.abs(want).max(-1, keepdims=True)
    assert np.array_equal(np.abs(back).max(-1), np.abs(want).max(-1).astype(np.float16).astype(np.float32))
    bound = np.abs(want) / 16 + amax / E4M3_MAX * 2**-9 + np.abs(want) * 2**-10  # e4m3 step, subnormals, float16
    assert np.all(np.abs(back - want) <= bound + 1e-12)
    # the rounding is round-to-nearest, not truncation: the errors average out
    rel = (back - want)[0] / np.abs(want[0])
    assert abs(rel.mean()) < 0.01 < np.abs(rel).max()
    with pytest.raises(ValueError, match="inf or NaN"):
        fp8_encode(torch.tensor([[1.0, float("nan")]]))


def test_float8_hidden_schema_has_a_byte_a_value_and_a_scale_a_position(tmp_path):
    from kdflow.cache_format import hidden_schema

    schema = hidden_schema(6, [0, 3], "float8_e4m3")
    assert schema.names == ["doc_index", "doc_id", "n_tokens", "positions"] + [
        "hidden_l0",
        "hidden_l0_scale",
        "hidden_l3",
        "hidden_l3_scale",
    ]
    assert schema.field("hidden_l3").type == pa.list_(pa.binary(6))
    assert schema.field("hidden_l3_scale").type == pa.list_(pa.float32())
    assert hidden_schema(6, [0]) == hidden_schema(6, [0], "float16")
    with pytest.raises(ValueError, match="value_dtype 'int4'"):
        hidden_schema(6, [0], "int4")

"""The per-cache index a training run depends on (kdflow.cache_index)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdflow.cache_format import CacheError, CacheMeta, CacheMismatch, encode_meta
from kdflow.cache_index import index_files, write_index

META = dict(
    format_version=1,
    kdflow_version="0.1.0",
    git_commit="abc",
    teacher="t",
    teacher_source_hash="abc",
    teacher_revision=None,
    teacher_layers=4,
    tokenizer_fingerprint="fp1",
    vocab_size=100,
    max_length=32,
    dtype="float32",
    value_dtype="float16",
    settings_hash="s",
    resume_key="r",
    cache="topk",
    k=4,
)


def cache_file(path, rows: int, **meta):
    table = pa.table({"doc_id": pa.array(range(rows), pa.int64())})
    meta = CacheMeta(**{**META, "shard": path.stem, "shard_sha256": path.stem, **meta})
    table = table.replace_schema_metadata(encode_meta(meta))
    pq.write_table(table, path)
    return path


def test_index_lists_the_files_in_order_with_their_rows(tmp_path):
    files = [cache_file(tmp_path / f"shard_{i:05d}.parquet", rows=i + 2) for i in range(3)]
    index = write_index(files, tmp_path / "index.json")
    assert index_files(tmp_path / "index.json") == [str(f) for f in files]
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert on_disk == index and index["rows"] == 2 + 3 + 4 and index["cache"] == "topk"
    assert [e["shard"] for e in index["files"]] == ["shard_00000", "shard_00001", "shard_00002"]
    assert index["meta"]["tokenizer_fingerprint"] == "fp1" and "shard_sha256" not in index["meta"]


def test_files_from_another_tokenizer_are_refused_naming_both(tmp_path):
    a = cache_file(tmp_path / "shard_00000.parquet", rows=2)
    b = cache_file(tmp_path / "shard_00001.parquet", rows=2, tokenizer_fingerprint="fp2")
    with pytest.raises(
        CacheMismatch,
        match=r"shard_00001.parquet: built with tokenizer_fingerprint='fp2', but .*"
        r"shard_00000.parquet with tokenizer_fingerprint='fp1'",
    ):
        write_index([a, b], tmp_path / "index.json")
    assert not (tmp_path / "index.json").exists()


def test_a_file_that_is_not_a_cache_is_refused(tmp_path):
    plain = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(CacheError, match="shard_00000.parquet: has no kdflow cache metadata"):
        write_index([plain], tmp_path / "index.json")
    with pytest.raises(CacheMismatch, match="no cache files"):
        write_index([], tmp_path / "index.json")

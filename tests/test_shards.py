"""Shard files sliced from the corpus: names, contents, metadata, determinism, independence of shards."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from kdflow.corpus import HELDOUT, shard_name
from kdflow.shards import ShardError, read_texts, shard_index, write_shard


@pytest.mark.parametrize(
    "name, index", [("heldout", HELDOUT), ("shard_00000", 0), ("shard_00042", 42), ("shard_99999", 99999)]
)
def test_shard_index(name, index):
    assert shard_index(name) == index


@pytest.mark.parametrize(
    "name",
    [
        "shard_42",
        "shard_000042",
        "shard_0004x",
        "shard-00042",
        "Heldout",
        "heldout.parquet",
        "shard_00042.parquet",
        "",
        "train",
    ],
)
def test_shard_index_refuses_other_names(name):
    with pytest.raises(ShardError, match="not a shard name"):
        shard_index(name)


def test_shard_name_round_trips():
    for i in (0, 7, 12345):
        assert shard_index(shard_name(i)) == i


def corpus_rows(path, index: int) -> list[dict]:
    return [
        {k: r[k] for k in ("doc_id", "source", "text")} for r in pq.read_table(path).to_pylist() if r["shard"] == index
    ]


@pytest.mark.parametrize("name", ["shard_00000", "shard_00002", "heldout"])
def test_shard_holds_exactly_its_corpus_rows_in_order(tmp_path, built_corpus, name):
    corpus, manifest, _ = built_corpus
    out = tmp_path / "shards" / f"{name}.parquet"
    n = write_shard(corpus, name, out)
    table = pq.read_table(out)
    assert table.column_names == ["doc_id", "source", "text"]
    expected = corpus_rows(corpus, shard_index(name))
    assert expected and table.to_pylist() == expected
    assert n == len(expected) == manifest["shards"][name]
    meta = pq.read_schema(out).metadata
    assert meta[b"kdflow.shard"] == name.encode()
    assert meta[b"kdflow.corpus_rows"] == str(n).encode()
    assert meta[b"kdflow.data_config_hash"].decode() == manifest["data_config_hash"]


def test_all_shards_together_are_the_corpus(tmp_path, built_corpus):
    corpus, _, data = built_corpus
    names = [shard_name(i) for i in range(data["n_shards"])] + ["heldout"]
    rows = []
    for name in names:
        write_shard(corpus, name, tmp_path / f"{name}.parquet")
        rows += pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
    assert sorted(r["doc_id"] for r in rows) == sorted(pq.read_table(corpus).column("doc_id").to_pylist())


def test_writing_a_shard_twice_is_byte_identical(tmp_path, built_corpus):
    corpus, _, _ = built_corpus
    out = tmp_path / "shard_00001.parquet"
    write_shard(corpus, "shard_00001", out)
    first = out.read_bytes()
    write_shard(corpus, "shard_00001", out)
    assert out.read_bytes() == first
    write_shard(corpus, "shard_00001", tmp_path / "elsewhere" / "copy.parquet")
    assert (tmp_path / "elsewhere" / "copy.parquet").read_bytes() == first
    assert sorted(p.name for p in tmp_path.glob(".*tmp*")) == []


def test_shard_without_rows_raises_and_writes_nothing(tmp_path, built_corpus):
    corpus, _, data = built_corpus
    out = tmp_path / "shard_00003.parquet"
    assert data["n_shards"] == 3
    with pytest.raises(ShardError, match="no rows for shard_00003"):
        write_shard(corpus, "shard_00003", out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_write_shard_refuses_bad_names(tmp_path, built_corpus):
    corpus, _, _ = built_corpus
    with pytest.raises(ShardError):
        write_shard(corpus, "shard_3", tmp_path / "x.parquet")


def test_read_texts(tmp_path, built_corpus):
    corpus, _, _ = built_corpus
    out = tmp_path / "heldout.parquet"
    write_shard(corpus, "heldout", out)
    texts = [r["text"] for r in corpus_rows(corpus, HELDOUT)]
    assert len(texts) >= 3
    assert read_texts(out) == texts
    assert read_texts(out, limit=2) == texts[:2]
    assert read_texts(out, limit=0) == []
    assert read_texts(out, limit=1000) == texts


def test_regenerating_one_shard_leaves_the_others_untouched(tmp_path, built_corpus):
    corpus, _, data = built_corpus
    folder = tmp_path / "shards"
    names = [shard_name(i) for i in range(data["n_shards"])] + ["heldout"]
    for name in names:
        write_shard(corpus, name, folder / f"{name}.parquet")
    old = 1_000_000_000_000_000_000  # 2001, in ns: any rewrite would move it
    for name in names:
        os.utime(folder / f"{name}.parquet", ns=(old, old))
    before = {name: (folder / f"{name}.parquet").read_bytes() for name in names}

    write_shard(corpus, "shard_00001", folder / "shard_00001.parquet")

    for name in names:
        path = folder / f"{name}.parquet"
        assert path.read_bytes() == before[name]
        if name == "shard_00001":
            assert path.stat().st_mtime_ns != old  # it was rewritten (same bytes)
        else:
            assert path.stat().st_mtime_ns == old, name
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.parquet" for n in names)

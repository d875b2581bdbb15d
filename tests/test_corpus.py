"""From sources to the corpus file: reading, held-out split, weights, long documents, shards, atomic output."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import pyarrow.parquet as pq
import pytest

from conftest import long_text
from kdflow import corpus
from kdflow.corpus import (
    HELDOUT,
    CorpusError,
    Doc,
    SourceReport,
    apply_weights,
    assign_shards,
    build_corpus,
    handle_long,
    normalise,
    pieces,
    read_documents,
    split_heldout,
)
from kdflow.sources import SourceError

STUB = [{"name": "a", "kind": "python_stdlib"}]  # never read: only for steps that take ``data`` settings


def doc(i: int, source: str = "a", text: str | None = None) -> Doc:
    text = f"document {i} of {source}" if text is None else text
    return Doc(f"{source}/{i}", source, text, hashlib.sha256(text.encode()).hexdigest())


def docs_of(n: int, source: str = "a") -> list[Doc]:
    return [doc(i, source) for i in range(n)]


def nonspace(text: str) -> str:
    return re.sub(r"\s", "", text)


# --- normalise ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("a\r\nb\r\n", "a\nb"),
        ("a\rb\rc", "a\nb\nc"),
        ("\r\n\r\n  x\r\n\r\ny  \n\n", "x\n\ny"),
        ("a\r\r\nb", "a\n\nb"),
        (" \t\n ", ""),
        ("inner  spaces\tkept", "inner  spaces\tkept"),
    ],
)
def test_normalise(raw, expected):
    assert normalise(raw) == expected


# --- read_documents -----------------------------------------------------------------------------


def test_short_and_empty_documents_are_dropped_and_counted(make_data, write_text_files):
    src = write_text_files("f", ["long enough", "", "   \r\n\t ", "tiny", "  pad  ", "also long enough"])
    docs, reports = read_documents(make_data([src], min_chars=5))
    assert [d.text for d in docs] == ["long enough", "also long enough"]
    assert reports["f"].empty == 4
    assert reports["f"].kept == 2
    assert reports["f"].read["records"] == 6


def test_documents_are_normalised_when_read(make_data, write_text_files):
    src = write_text_files("f", ["\r\n  line one\r\nline two\r\n\r\n"])
    docs, _ = read_documents(make_data([src]))
    assert docs[0].text == "line one\nline two"
    assert docs[0].source == "f"
    assert docs[0].doc_id.startswith("f/")


def test_duplicates_across_sources_keep_first_and_count_on_later(make_data, write_text_files, write_jsonl):
    first = write_text_files("first", ["shared text", "only in first"])
    second = write_jsonl(
        "second", [{"text": "own text"}, {"text": "shared text\r\n"}, {"text": "own text"}, {"text": "only in first"}]
    )
    docs, reports = read_documents(make_data([first, second]))
    assert [(d.source, d.text) for d in docs] == [
        ("first", "shared text"),
        ("first", "only in first"),
        ("second", "own text"),
    ]
    assert reports["first"].duplicate == 0
    assert reports["second"].duplicate == 3
    assert reports["second"].kept == 1
    assert docs[2].doc_id.endswith(":1")  # the first occurrence within the source is kept too


def test_duplicate_count_follows_source_order(make_data, write_text_files, write_jsonl):
    first = write_text_files("first", ["shared text", "only in first"])
    second = write_jsonl("second", [{"text": "shared text"}, {"text": "own text"}])
    docs, reports = read_documents(make_data([second, first]))
    assert reports["second"].duplicate == 0 and reports["first"].duplicate == 1
    assert [d for d in docs if d.text == "shared text"][0].source == "second"


def test_max_docs_caps_kept_documents(make_data, write_jsonl):
    capped = write_jsonl(
        "capped",
        [{"text": ""}, {"text": "one"}, {"text": "one"}] + [{"text": f"doc {i}"} for i in range(5)],
        max_docs=3,
    )
    free = write_jsonl("free", [{"text": f"free {i}"} for i in range(4)])
    docs, reports = read_documents(make_data([capped, free]))
    assert [d.text for d in docs if d.source == "capped"] == ["one", "doc 0", "doc 1"]
    assert reports["capped"].kept == 3 and reports["capped"].capped is True
    assert reports["capped"].empty == 1 and reports["capped"].duplicate == 1
    assert reports["free"].kept == 4 and reports["free"].capped is False


def test_source_without_usable_document_names_it(make_data, write_text_files, write_jsonl):
    good = write_text_files("good", ["a real document"])
    blank = write_jsonl("blanksrc", [{"text": " "}, {"text": ""}])
    with pytest.raises(CorpusError, match="blanksrc"):
        read_documents(make_data([good, blank]))


def test_source_of_only_duplicates_is_refused(make_data, write_text_files, write_jsonl):
    good = write_text_files("good", ["a real document"])
    dups = write_jsonl("copies", [{"text": "a real document"}])
    with pytest.raises(CorpusError, match="copies"):
        read_documents(make_data([good, dups]))


def test_malformed_lines_are_counted_in_the_report(make_data, write_jsonl):
    records: list = [{"text": f"line {i}"} for i in range(99)]
    records.insert(40, "{broken")
    src = write_jsonl("j", records)
    docs, reports = read_documents(make_data([src]))  # 1 of 100 = max_fraction 0.01: allowed
    assert len(docs) == 99
    assert reports["j"].read == {"records": 100, "malformed": 1, "unrecognised": 0}


def test_too_many_malformed_lines_raise(make_data, write_jsonl):
    records: list = [{"text": f"line {i}"} for i in range(98)]
    records[10:10] = ["{broken", "[1, 2]"]
    src = write_jsonl("j", records)
    with pytest.raises(SourceError, match="'j'.*2 of 100"):
        read_documents(make_data([src]))
    # A higher limit lets the same file through.
    docs, reports = read_documents(make_data([src], bad_lines={"max_fraction": 0.05}))
    assert reports["j"].read["malformed"] == 2 and len(docs) == 98


# --- split_heldout ------------------------------------------------------------------------------


def test_split_is_a_partition_by_id_and_text(make_data):
    docs = docs_of(100)
    train, held = split_heldout(docs, make_data(STUB, heldout={"fraction": 0.1}))
    assert len(held) == 10 and len(train) == 90
    assert not {d.doc_id for d in train} & {d.doc_id for d in held}
    assert not {d.text for d in train} & {d.text for d in held}
    assert sorted(d.doc_id for d in train + held) == sorted(d.doc_id for d in docs)


def test_split_respects_max_docs(make_data):
    train, held = split_heldout(docs_of(100), make_data(STUB, heldout={"fraction": 0.5, "max_docs": 3}))
    assert len(held) == 3 and len(train) == 97


def test_split_holds_out_at_least_one(make_data):
    train, held = split_heldout(docs_of(5), make_data(STUB, heldout={"fraction": 0.01}))
    assert len(held) == 1 and len(train) == 4


@pytest.mark.parametrize("fraction", [0.01, 0.5])
def test_split_with_too_few_documents_raises(make_data, fraction):
    with pytest.raises(CorpusError, match="data.heldout"):
        split_heldout(docs_of(1), make_data(STUB, heldout={"fraction": fraction}))


def test_split_of_two_documents_keeps_one_for_training(make_data):
    train, held = split_heldout(docs_of(2), make_data(STUB, heldout={"fraction": 0.5}))
    assert len(train) == 1 and len(held) == 1


def test_split_does_not_depend_on_source_order(make_data):
    docs = docs_of(30, "a") + docs_of(30, "b")
    data = make_data(STUB, heldout={"fraction": 0.2})
    _, held = split_heldout(docs, data)
    _, held_rev = split_heldout(list(reversed(docs)), data)
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    _, held_shuf = split_heldout(shuffled, data)
    assert {d.text for d in held} == {d.text for d in held_rev} == {d.text for d in held_shuf}


def test_split_depends_on_seed(make_data):
    docs = docs_of(200)
    held = {
        seed: {d.text for d in split_heldout(docs, make_data(STUB, seed=seed, heldout={"fraction": 0.1}))[1]}
        for seed in (0, 1)
    }
    assert len(held[0]) == len(held[1]) == 20
    assert held[0] != held[1]
    again = {d.text for d in split_heldout(docs, make_data(STUB, seed=0, heldout={"fraction": 0.1}))[1]}
    assert again == held[0]


# --- apply_weights ------------------------------------------------------------------------------


def weighted(make_data, train, weights: dict[str, float], seed: int = 0) -> list[Doc]:
    sources = [{"name": n, "kind": "python_stdlib", "weight": w} for n, w in weights.items()]
    return apply_weights(train, make_data(sources, seed=seed))


@pytest.mark.parametrize("n", [4, 7, 10])
def test_weight_below_one_is_a_subset(make_data, n):
    train = docs_of(n)
    out = weighted(make_data, train, {"a": 0.5})
    assert len(out) == round(n * 0.5)
    assert len({d.doc_id for d in out}) == len(out)
    assert {d.doc_id for d in out} <= {d.doc_id for d in train}
    assert [d.doc_id for d in weighted(make_data, train, {"a": 0.5})] == [d.doc_id for d in out]


def test_weight_two_repeats_every_document_with_distinct_ids(make_data):
    train = docs_of(5)
    out = weighted(make_data, train, {"a": 2})
    assert len(out) == 10 and len({d.doc_id for d in out}) == 10
    assert sorted(d.doc_id for d in out) == sorted([d.doc_id for d in train] + [f"{d.doc_id}@1" for d in train])
    assert Counter(d.text for d in out) == Counter({d.text: 2 for d in train})


def test_weight_one_and_a_half(make_data):
    train = docs_of(6)
    out = weighted(make_data, train, {"a": 1.5})
    ids = [d.doc_id for d in out]
    assert len(ids) == 9 and len(set(ids)) == 9
    originals = {d.doc_id for d in train}
    assert originals <= set(ids)
    extra = [i for i in ids if i not in originals]
    assert len(extra) == 3 and all(i.endswith("@1") and i[:-2] in originals for i in extra)


def test_weight_one_keeps_everything(make_data):
    train = docs_of(5)
    assert [d.doc_id for d in weighted(make_data, train, {"a": 1})] == [d.doc_id for d in train]


def test_weights_are_per_source(make_data):
    train = docs_of(4, "a") + docs_of(6, "b")
    out = weighted(make_data, train, {"a": 2, "b": 0.5})
    assert Counter(d.source for d in out) == {"a": 8, "b": 3}
    alone = weighted(make_data, train, {"a": 1, "b": 0.5})
    assert {d.doc_id for d in out if d.source == "b"} == {d.doc_id for d in alone if d.source == "b"}


# --- pieces / handle_long -----------------------------------------------------------------------


def test_pieces_cut_at_line_ends():
    text = "aaaa\nbbbb\ncccc\ndddd"
    assert pieces(text, 10) == ["aaaa\nbbbb", "cccc\ndddd"]
    assert pieces(text, 100) == [text]


def test_single_over_long_line_is_hard_cut():
    assert pieces("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert pieces("short\n" + "y" * 30, 12) == ["short\nyyyyyy", "y" * 12, "y" * 12]


def test_pieces_never_exceed_limit_and_lose_no_content():
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab  \n") for _ in range(rng.randint(1, 80))).strip()
        limit = rng.randint(1, 20)
        out = pieces(text, limit)
        assert all(0 < len(p) <= limit for p in out), (text, limit, out)
        assert nonspace("".join(out)) == nonspace(text), (text, limit, out)


def long_docs(make_data, mode: str, **extra):
    data = make_data(STUB, max_chars=100, long_docs=mode, min_chars=1, **extra)
    docs = [doc(0, text="short one"), doc(1, text=long_text("L", n_lines=10, width=30)), doc(2, text="z" * 250)]
    reports = {"a": SourceReport()}
    return docs, handle_long(docs, data, reports, "train"), reports["a"]


def test_truncate_keeps_a_prefix(make_data):
    docs, out, report = long_docs(make_data, "truncate")
    assert [d.doc_id for d in out] == [d.doc_id for d in docs]
    assert out[0].text == "short one"
    for before, after in zip(docs[1:], out[1:], strict=False):
        assert 0 < len(after.text) <= 100 and before.text.startswith(after.text)
    assert out[1].text == "\n".join(docs[1].text.split("\n")[:3])  # cut at the last line end that fits
    assert report.truncated == 2 and report.train_pieces == 3


def test_drop_drops_and_counts(make_data):
    _, out, report = long_docs(make_data, "drop")
    assert [d.text for d in out] == ["short one"]
    assert report.too_long_dropped == 2 and report.train_pieces == 1


def test_split_cuts_long_documents_into_pieces(make_data):
    docs, out, report = long_docs(make_data, "split")
    assert out[0].doc_id == "a/0"
    piece_ids = [d.doc_id for d in out[1:]]
    assert all(re.fullmatch(r"a/[12]#\d+", i) for i in piece_ids)
    assert all(len(d.text) <= 100 for d in out)
    assert nonspace("".join(d.text for d in out if d.doc_id.startswith("a/1#"))) == nonspace(docs[1].text)
    assert [d.text for d in out if d.doc_id.startswith("a/2#")] == ["z" * 100, "z" * 100, "z" * 50]
    assert report.split == 2 and report.train_pieces == len(out)


def test_split_respects_max_pieces(make_data):
    _, out, _ = long_docs(make_data, "split", max_pieces=2)
    assert [d.doc_id for d in out if d.doc_id.startswith("a/2#")] == ["a/2#0", "a/2#1"]
    assert sum(d.doc_id.startswith("a/1#") for d in out) == 2


def test_split_drops_pieces_below_min_chars(make_data):
    data = make_data(STUB, max_chars=100, long_docs="split", min_chars=60)
    reports = {"a": SourceReport()}
    out = handle_long([doc(0, text="z" * 250)], data, reports, "heldout")
    assert [d.text for d in out] == ["z" * 100, "z" * 100]
    assert reports["a"].short_pieces_dropped == 1 and reports["a"].heldout_pieces == 2


# --- assign_shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_docs, n_shards", [(10, 3), (12, 4), (7, 7), (50, 1)])
def test_shards_are_balanced_and_complete(n_docs, n_shards):
    train = docs_of(n_docs)
    shards = assign_shards(train, n_shards, seed=0)
    assert len(shards) == n_shards
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    ids = [d.doc_id for s in shards for d in s]
    assert sorted(ids) == sorted(d.doc_id for d in train)
    again = assign_shards(list(reversed(train)), n_shards, seed=0)
    assert [[d.doc_id for d in s] for s in again] == [[d.doc_id for d in s] for s in shards]


def test_shard_assignment_depends_on_seed():
    train = docs_of(40)
    a = [[d.doc_id for d in s] for s in assign_shards(train, 4, seed=0)]
    b = [[d.doc_id for d in s] for s in assign_shards(train, 4, seed=1)]
    assert a != b


def test_more_shards_than_documents_raises():
    with pytest.raises(CorpusError, match="n_shards=5"):
        assign_shards(docs_of(4), 5, seed=0)


# --- build_corpus -------------------------------------------------------------------------------


def test_build_corpus_file_layout(built_corpus):
    path, manifest, data = built_corpus
    table = pq.read_table(path)
    assert table.column_names == ["shard", "doc_id", "source", "text"]
    shard_col = table.column("shard").to_pylist()
    assert shard_col == sorted(shard_col), "rows are grouped by shard, held-out first"
    assert set(shard_col) == {HELDOUT, 0, 1, 2}
    assert len(set(table.column("doc_id").to_pylist())) == table.num_rows
    meta = pq.read_schema(path).metadata
    assert meta[b"kdflow.data_config_hash"].decode() == manifest["data_config_hash"]
    assert pq.ParquetFile(path).metadata.num_row_groups == 4  # one per shard: a shard job reads its own


def test_build_corpus_manifest_counts(built_corpus):
    path, manifest, data = built_corpus
    rows = pq.read_table(path).to_pylist()
    files, lines = manifest["sources"]["files"], manifest["sources"]["lines"]
    assert (files["kept"], files["empty"], files["duplicate"]) == (13, 1, 0)
    assert (lines["kept"], lines["empty"], lines["duplicate"]) == (10, 1, 1)
    assert lines["read"] == {"records": 13, "malformed": 1, "unrecognised": 0}
    assert files["read"] == {"records": 14, "malformed": 0, "unrecognised": 0}
    for name, rep in manifest["sources"].items():
        assert rep["heldout"] + rep["train"] == rep["kept"]
        assert rep["train_pieces"] == sum(r["shard"] >= 0 and r["source"] == name for r in rows)
        assert rep["heldout_pieces"] == sum(r["shard"] == HELDOUT and r["source"] == name for r in rows)
        assert rep["truncated"] == 0 and rep["too_long_dropped"] == 0
    assert files["split"] == 2  # the two long documents (both sides counted)
    assert sum("#" in r["doc_id"] for r in rows) == 4  # two pieces each
    assert manifest["documents"]["kept"] == 23
    assert sum(rep["heldout"] for rep in manifest["sources"].values()) == round(0.2 * 23)
    counts = Counter(r["shard"] for r in rows)
    assert manifest["shards"] == {
        "shard_00000": counts[0],
        "shard_00001": counts[1],
        "shard_00002": counts[2],
        "heldout": counts[HELDOUT],
    }
    assert manifest["documents"]["train_pieces"] == sum(counts[i] for i in range(3))
    on_disk = json.loads((path.parent / "manifest.json").read_text())
    assert on_disk["shards"] == manifest["shards"] and on_disk["sources"] == manifest["sources"]


def test_build_corpus_pieces_stay_on_their_side(built_corpus):
    path, _, _ = built_corpus
    rows = pq.read_table(path).to_pylist()
    base = lambda doc_id: doc_id.split("#")[0].split("@")[0]  # noqa: E731
    held = {base(r["doc_id"]) for r in rows if r["shard"] == HELDOUT}
    train = {base(r["doc_id"]) for r in rows if r["shard"] != HELDOUT}
    assert held and train and not held & train
    assert not {r["text"] for r in rows if r["shard"] == HELDOUT} & {r["text"] for r in rows if r["shard"] != HELDOUT}
    assert all(len(r["text"]) <= 200 for r in rows)


def test_build_corpus_is_byte_identical_and_leaves_no_temporaries(tmp_path, built_corpus):
    path, _, data = built_corpus
    first = path.read_bytes()
    other = tmp_path / "again" / "corpus.parquet"
    build_corpus(data, path, path.parent / "manifest.json")
    build_corpus(data, other, other.parent / "manifest.json")
    assert path.read_bytes() == first
    assert other.read_bytes() == first
    for folder in (path.parent, other.parent):
        assert sorted(p.name for p in folder.iterdir()) == ["corpus.parquet", "manifest.json"]


def test_build_corpus_changes_with_seed(tmp_path, corpus_data):
    a = tmp_path / "a" / "corpus.parquet"
    b = tmp_path / "b" / "corpus.parquet"
    build_corpus(corpus_data, a, a.parent / "manifest.json")
    build_corpus(dict(corpus_data, seed=8), b, b.parent / "manifest.json")
    assert pq.read_table(a).to_pylist() != pq.read_table(b).to_pylist()


def boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_failed_build_before_writing_keeps_previous_corpus(built_corpus, monkeypatch):
    path, _, data = built_corpus
    before = path.read_bytes()
    manifest_before = (path.parent / "manifest.json").read_bytes()
    monkeypatch.setattr(corpus, "assign_shards", boom)
    with pytest.raises(RuntimeError, match="boom"):
        build_corpus(dict(data, seed=99), path, path.parent / "manifest.json")
    assert path.read_bytes() == before
    assert (path.parent / "manifest.json").read_bytes() == manifest_before
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.parquet", "manifest.json"]


def test_failed_build_while_writing_keeps_previous_corpus(built_corpus, monkeypatch):
    path, _, data = built_corpus
    before = path.read_bytes()
    real = pq.ParquetWriter.write_table
    calls = []

    def write_then_fail(self, table, *args, **kwargs):
        calls.append(table.num_rows)
        if len(calls) == 2:  # after the held-out rows are in the temporary file
            raise OSError("disk full")
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_corpus(dict(data, seed=99), path, path.parent / "manifest.json")
    assert len(calls) == 2
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.parquet", "manifest.json"]

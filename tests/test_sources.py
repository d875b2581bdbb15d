"""Tests for kdflow.sources: every source kind, the counts, bad-line handling and determinism."""

from __future__ import annotations

import itertools
import json
import logging
import os
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdflow.sources import RawDoc, SourceCounts, SourceError, check_bad_lines, read_source

LOG = logging.getLogger("kdflow.test_sources")
SKIP = {"policy": "skip", "max_fraction": 0.01}
FAIL = {"policy": "fail", "max_fraction": 0.01}


def spec(kind: str, **over) -> dict:
    """A ``data.sources`` item with the schema defaults filled in, as the config loader gives it."""
    base = {
        "name": "src",
        "kind": kind,
        "weight": 1.0,
        "max_docs": None,
        "exclude": [],
        "format": "auto",
        "field": None,
        "config_name": None,
        "split": "train",
        "revision": None,
        "streaming": False,
    }
    base.update(over)
    return base


def read(s: dict, bad_lines: dict = SKIP) -> tuple[list[RawDoc], SourceCounts]:
    counts = SourceCounts()
    return list(read_source(s, counts, bad_lines, LOG)), counts


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Work in tmp_path so that paths in specs and doc ids are short and relative."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- SourceCounts, check_bad_lines ----------------------------------------------------------------


def test_counts_as_dict():
    assert SourceCounts(3, 1, 2).as_dict() == {"records": 3, "malformed": 1, "unrecognised": 2}


def test_check_bad_lines_over_the_limit():
    with pytest.raises(SourceError) as e:
        check_bad_lines({"name": "web"}, SourceCounts(records=50, malformed=2), SKIP)
    msg = str(e.value)
    assert msg.startswith("source 'web': 2 of 50 lines (4.00%) are malformed")
    assert "data.bad_lines.max_fraction=0.01" in msg and "raise the limit" in msg


@pytest.mark.parametrize(
    "counts, bad_lines",
    [
        (SourceCounts(records=100, malformed=1), SKIP),  # exactly at the limit
        (SourceCounts(records=0, malformed=0), SKIP),  # nothing read
        (SourceCounts(records=4, malformed=1), {"policy": "skip", "max_fraction": 0.25}),
        (SourceCounts(records=4, malformed=4), FAIL),  # fail already stopped at the first one
    ],
)
def test_check_bad_lines_passes(counts, bad_lines):
    assert check_bad_lines({"name": "web"}, counts, bad_lines) is None


# --- jsonl ----------------------------------------------------------------------------------------


@pytest.fixture
def messy_jsonl(in_tmp) -> Path:
    write_lines(
        in_tmp / "data" / "a.jsonl",
        [
            b'{"text": "first"}',
            b"",
            b'{"text": "broken',
            b"   ",
            b"\xff\xfe not utf-8",
            b"[1, 2]",
            b'{"prompt": "P", "response": "R"}',
            b'{"n": 1}',
        ],
    )
    return in_tmp / "data" / "a.jsonl"


def test_jsonl_skip_counts_and_warnings(messy_jsonl, caplog):
    caplog.set_level(logging.WARNING)
    docs, counts = read(spec("jsonl", paths=["data/a.jsonl"]))
    assert docs == [
        RawDoc("src/data/a.jsonl:1", "first"),
        RawDoc("src/data/a.jsonl:7", "User: P\n\nAssistant: R"),
    ]
    # Blank lines 2 and 4 are neither counted nor reported.
    assert counts.as_dict() == {"records": 6, "malformed": 3, "unrecognised": 1}
    msgs = warnings(caplog)
    assert any(m.startswith("data/a.jsonl:3: invalid JSON") for m in msgs)
    assert any(m.startswith("data/a.jsonl:5: not valid UTF-8 (byte 0xff") for m in msgs)
    assert any(m.startswith("data/a.jsonl:6: a JSON object was expected, found an array") for m in msgs)
    assert any("data/a.jsonl:8: record not recognised" in m and "'n'" in m for m in msgs)
    assert not any(":2:" in m or ":4:" in m for m in msgs)
    with pytest.raises(SourceError, match=r"3 of 6 lines"):
        check_bad_lines(spec("jsonl"), counts, SKIP)


def test_jsonl_policy_fail_stops_at_first_bad_line(messy_jsonl):
    counts = SourceCounts()
    it = read_source(spec("jsonl", paths=["data/a.jsonl"]), counts, FAIL, LOG)
    assert next(it) == RawDoc("src/data/a.jsonl:1", "first")
    with pytest.raises(SourceError) as e:
        next(it)
    msg = str(e.value)
    assert "source 'src'" in msg and "data/a.jsonl:3: invalid JSON" in msg
    assert "data.bad_lines.policy: skip" in msg


def test_jsonl_policy_fail_on_non_utf8(in_tmp):
    write_lines(in_tmp / "b.jsonl", [b'{"text": "ok"}', b'{"text": "\xff"}'])
    with pytest.raises(SourceError, match=r"b\.jsonl:2: not valid UTF-8"):
        read(spec("jsonl", paths=["b.jsonl"]), FAIL)


def test_jsonl_bom_on_first_line_is_accepted(in_tmp):
    write_lines(in_tmp / "bom.jsonl", [b'\xef\xbb\xbf{"text": "x"}'])
    docs, counts = read(spec("jsonl", paths=["bom.jsonl"]))
    assert docs == [RawDoc("src/bom.jsonl:1", "x")] and counts.malformed == 0


def test_jsonl_format_and_field(in_tmp):
    write_lines(in_tmp / "c.jsonl", [json.dumps({"body": "B", "text": "T"}).encode()])
    assert read(spec("jsonl", paths=["c.jsonl"], field="body"))[0][0].text == "B"
    assert read(spec("jsonl", paths=["c.jsonl"], format="text"))[0][0].text == "T"


def test_jsonl_unrecognised_logged_at_most_five_times(in_tmp, caplog):
    caplog.set_level(logging.WARNING)
    write_lines(in_tmp / "u.jsonl", [b'{"n": %d}' % i for i in range(8)])
    docs, counts = read(spec("jsonl", paths=["u.jsonl"]))
    assert docs == [] and counts.as_dict() == {"records": 8, "malformed": 0, "unrecognised": 8}
    msgs = warnings(caplog)
    assert [m.split(": ")[1] for m in msgs[:5]] == [f"u.jsonl:{i}" for i in range(1, 6)]
    assert len(msgs) == 6 and "only counted" in msgs[5]


def test_jsonl_globs_sorted_in_config_order_without_duplicates(in_tmp):
    for name in ["b/2.jsonl", "b/1.jsonl", "a.jsonl"]:
        write_lines(in_tmp / name, [json.dumps({"text": name}).encode()])
    docs, _ = read(spec("jsonl", paths=["b/*.jsonl", "a.jsonl", "**/*.jsonl"]))
    assert [d.doc_id for d in docs] == ["src/b/1.jsonl:1", "src/b/2.jsonl:1", "src/a.jsonl:1"]


def test_glob_matching_nothing_names_the_pattern(in_tmp):
    write_lines(in_tmp / "a.jsonl", [b'{"text": "x"}'])
    with pytest.raises(SourceError) as e:
        read(spec("jsonl", paths=["a.jsonl", "missing/*.jsonl"]))
    assert "source 'src'" in str(e.value) and "'missing/*.jsonl' matches no file" in str(e.value)


def test_stopping_early_closes_the_file(in_tmp):
    write_lines(in_tmp / "many.jsonl", [b'{"text": "t%d"}' % i for i in range(10)])
    counts = SourceCounts()
    it = read_source(spec("jsonl", paths=["many.jsonl"]), counts, SKIP, LOG)
    assert [d.text for d in itertools.islice(it, 3)] == ["t0", "t1", "t2"]
    it.close()
    assert counts.records == 3
    # The generator's `with` has run: no descriptor of the process still points at the file.
    fd_dir = Path("/proc/self/fd")
    if fd_dir.is_dir():
        target = str(in_tmp / "many.jsonl")
        assert not any(os.path.realpath(fd) == target for fd in fd_dir.iterdir())


# --- parquet --------------------------------------------------------------------------------------


@pytest.fixture
def parquet_file(in_tmp) -> Path:
    table = pa.table(
        {
            "id": [1, 2, 3],
            "body": ["alpha", "beta", None],
            "chat": [
                [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
                [],
                [{"role": "user", "content": "Q3"}],
            ],
        }
    )
    path = in_tmp / "p.parquet"
    pq.write_table(table, path)
    return path


def test_parquet_field(parquet_file, caplog):
    caplog.set_level(logging.WARNING)
    docs, counts = read(spec("parquet", paths=["p.parquet"], field="body"))
    assert docs == [RawDoc("src/p.parquet:0", "alpha"), RawDoc("src/p.parquet:1", "beta")]
    assert counts.as_dict() == {"records": 3, "malformed": 0, "unrecognised": 1}
    assert any("p.parquet:2: record not recognised" in m for m in warnings(caplog))


def test_parquet_field_holding_messages(parquet_file):
    docs, _ = read(spec("parquet", paths=["p.parquet"], field="chat"))
    assert [d.text for d in docs] == ["User: Q1\n\nAssistant: A1", "", "User: Q3"]


def test_parquet_missing_field_lists_columns(parquet_file):
    with pytest.raises(SourceError) as e:
        read(spec("parquet", paths=["p.parquet"], field="text"))
    msg = str(e.value)
    assert "source 'src'" in msg and "p.parquet has no column 'text'" in msg
    assert "id, body, chat" in msg


def test_parquet_many_batches_keep_row_numbers(in_tmp):
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(2500)]}), in_tmp / "big.parquet")
    docs, counts = read(spec("parquet", paths=["*.parquet"]))
    assert counts.records == 2500
    assert docs[1024] == RawDoc("src/big.parquet:1024", "r1024")
    assert docs[-1] == RawDoc("src/big.parquet:2499", "r2499")


def test_parquet_not_a_parquet_file(in_tmp):
    (in_tmp / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"bad\.parquet: cannot be read as Parquet"):
        read(spec("parquet", paths=["bad.parquet"]))


# --- text_files -----------------------------------------------------------------------------------


@pytest.fixture
def text_tree(in_tmp) -> Path:
    files = {
        "docs/b.md": b"bee",
        "docs/a.md": b"ay",
        "docs/sub/c.md": b"sea",
        "docs/sub/skip_me.md": b"no",
        "docs/notes.txt": b"txt",
        "docs/latin1.md": "caf\u00e9".encode("latin-1"),
    }
    for name, data in files.items():
        (in_tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (in_tmp / name).write_bytes(data)
    return in_tmp


def test_text_files_glob_exclude_and_bad_encoding(text_tree, caplog):
    caplog.set_level(logging.WARNING)
    s = spec("text_files", paths=["docs/**/*.md", "docs/notes.txt"], exclude=["*/skip_*"])
    docs, counts = read(s)
    assert docs == [
        RawDoc("src/docs/a.md", "ay"),
        RawDoc("src/docs/b.md", "bee"),
        RawDoc("src/docs/sub/c.md", "sea"),
        RawDoc("src/docs/notes.txt", "txt"),
    ]
    assert counts.as_dict() == {"records": 5, "malformed": 1, "unrecognised": 0}
    assert any("docs/latin1.md" in m and "not UTF-8" in m for m in warnings(caplog))


def test_text_files_keep_bytes_as_they_are(in_tmp):
    (in_tmp / "crlf.txt").write_bytes(b"a\r\nb\r\n  ")
    assert read(spec("text_files", paths=["crlf.txt"]))[0] == [RawDoc("src/crlf.txt", "a\r\nb\r\n  ")]


def test_text_files_pattern_matching_only_directories(in_tmp):
    (in_tmp / "emptydir").mkdir()
    with pytest.raises(SourceError, match=r"'emptydir' matches no file"):
        read(spec("text_files", paths=["emptydir"]))


# --- python_stdlib --------------------------------------------------------------------------------


def test_python_stdlib_first_files():
    counts = SourceCounts()
    docs = list(itertools.islice(read_source(spec("python_stdlib"), counts, SKIP, LOG), 20))
    assert len(docs) == 20
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert all(i.startswith("src/") for i in ids)
    assert all(i.endswith(".py") and "site-packages" not in i and "__pycache__" not in i for i in ids)
    root = Path(sysconfig.get_paths()["stdlib"])
    first = docs[0]
    assert first.text == (root / first.doc_id.removeprefix("src/")).read_text(encoding="utf-8")
    assert counts.records >= 20


def test_python_stdlib_exclude_and_locator():
    s = spec("python_stdlib", exclude=["_*", "a*", "b*"])
    docs = list(itertools.islice(read_source(s, SourceCounts(), SKIP, LOG), 5))
    assert len(docs) == 5 and all(d.doc_id.split("/", 1)[1][0] not in "_ab" for d in docs)
    # Excluding every top-level module that sorts before "json" brings its package to the front.
    s = spec("python_stdlib", exclude=["[!j]*", "json/t*"])
    ids = [d.doc_id for d in read_source(s, SourceCounts(), SKIP, LOG)]
    assert ids[:3] == ["src/json/__init__.py", "src/json/decoder.py", "src/json/encoder.py"]


def test_python_stdlib_never_reads_site_packages():
    # Only paths starting with "s" are left, site-packages among them when it is below the stdlib.
    s = spec("python_stdlib", exclude=["[!s]*"])
    ids = [d.doc_id for d in read_source(s, SourceCounts(), SKIP, LOG)]
    assert "src/subprocess.py" in ids
    assert not any("site-packages" in i or "dist-packages" in i or "__pycache__" in i for i in ids)


# --- hf -------------------------------------------------------------------------------------------


@pytest.fixture
def hf_env(tmp_path, monkeypatch) -> Path:
    """Offline, with every datasets/hub cache under tmp_path.

    `datasets` reads the variables once at import, and another test may have imported it
    already: patch the module-level values too.
    """
    import datasets
    import huggingface_hub.constants

    cache = tmp_path / "hf_home" / "datasets"
    for var, value in [
        ("HF_HOME", str(tmp_path / "hf_home")),
        ("HF_DATASETS_CACHE", str(cache)),
        ("HF_DATASETS_OFFLINE", "1"),
        ("HF_HUB_OFFLINE", "1"),
    ]:
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def local_dataset(tmp_path) -> Path:
    d = tmp_path / "my_ds"
    rows = [
        {"text": "one", "messages": None},
        {"text": None, "messages": [{"role": "user", "content": "hi"}]},
        {"text": None, "messages": None},
        {"text": "four", "messages": None},
    ]
    write_lines(d / "train.jsonl", [json.dumps(r).encode() for r in rows])
    return d


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_local_directory(hf_env, local_dataset, streaming, caplog):
    caplog.set_level(logging.WARNING)
    s = spec("hf", name="local", dataset=str(local_dataset), streaming=streaming)
    docs, counts = read(s)
    assert docs == [
        RawDoc("local/train:0", "one"),
        RawDoc("local/train:1", "User: hi"),
        RawDoc("local/train:3", "four"),
    ]
    assert counts.as_dict() == {"records": 4, "malformed": 0, "unrecognised": 1}
    assert any("train:2: record not recognised" in m for m in warnings(caplog))
    if not streaming:
        assert hf_env.is_dir()  # materialised in the patched cache, not the user's


def test_hf_field(hf_env, local_dataset):
    s = spec("hf", dataset=str(local_dataset), field="messages")
    docs, counts = read(s)
    assert docs == [RawDoc("src/train:1", "User: hi")] and counts.unrecognised == 3


def test_hf_offline_and_not_cached(hf_env):
    s = spec("hf", name="remote", dataset="nonexistent-org/nonexistent-ds")
    with pytest.raises(SourceError) as e:
        read(s)
    msg = str(e.value)
    assert "source 'remote'" in msg and "'nonexistent-org/nonexistent-ds'" in msg
    assert "split 'train'" in msg and "offline mode is set" in msg and "not in the local cache" in msg
    assert str(hf_env) in msg and "HF_DATASETS_CACHE" in msg and "unset the offline variable" in msg
    assert e.value.__cause__ is not None


@pytest.mark.parametrize("offline", ["0", "1"])
def test_hf_other_failure_keeps_original_error(hf_env, tmp_path, monkeypatch, offline):
    # Offline or not, a local directory's own fault must not be blamed on the cache.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    s = spec("hf", dataset=str(tmp_path / "my_ds_missing_split"), split="train")
    (tmp_path / "my_ds_missing_split").mkdir()
    (tmp_path / "my_ds_missing_split" / "test.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(SourceError) as e:
        read(s)
    msg = str(e.value)
    assert "cannot load dataset" in msg and "split 'train'" in msg and "offline mode" not in msg
    assert f"{type(e.value.__cause__).__name__}: {e.value.__cause__}" in msg


# --- determinism ----------------------------------------------------------------------------------


def test_reading_twice_gives_the_same_documents(messy_jsonl, parquet_file, text_tree):
    for s in [
        spec("jsonl", paths=["**/*.jsonl"]),
        spec("parquet", paths=["*.parquet"], field="body"),
        spec("text_files", paths=["docs/**"]),
    ]:
        first, c1 = read(s)
        second, c2 = read(s)
        assert first and first == second and c1 == c2

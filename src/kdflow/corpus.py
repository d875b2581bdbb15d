"""From configured sources to one corpus file that the shard jobs slice.

Steps, in order (each documented in config/README.md, "Data"):

1. read every source in config order (``kdflow.sources``), turn records into text, normalise line
   endings and strip; drop documents shorter than ``min_chars`` (counted ``empty``) and exact duplicates
   across all sources (``duplicate``; the first occurrence wins); stop a source at ``max_docs`` kept;
2. split off the held-out set by whole document: documents ordered by a seeded hash of their text, the
   first ``round(fraction x n)`` (at most ``max_docs``) are held out. A source file or record is thus on
   one side only, and the split does not depend on source order;
3. weight each source's training documents (``weight``: subsample below 1, repeat above 1);
4. handle long documents (``long_docs``: truncate, split into pieces, or drop); the pieces of one
   document stay on its side of the split;
5. order training pieces by a seeded hash of their id and deal them round-robin into ``n_shards``
   shards, so shards are balanced and the result does not depend on the machine or on timing.

The corpus is written as one Parquet file sorted by shard (the held-out set is shard -1), one row group
per shard, so that a shard job reads only its own rows.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from kdflow.atomic import atomic_path, write_json
from kdflow.config import config_hash
from kdflow.errors import KdflowError
from kdflow.provenance import provenance
from kdflow.sources import SourceCounts, check_bad_lines, read_source

HELDOUT = -1
CORPUS_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string())]
)

log = logging.getLogger(__name__)


class CorpusError(KdflowError, RuntimeError):
    """The configured data cannot make the requested corpus (too few documents, an empty shard)."""


@dataclass
class Doc:
    doc_id: str
    source: str
    text: str
    sha: str


@dataclass
class SourceReport:
    """What happened to one source's records; written to the data manifest."""

    read: dict = field(default_factory=dict)
    empty: int = 0
    duplicate: int = 0
    kept: int = 0
    capped: bool = False
    heldout: int = 0
    train: int = 0
    train_weighted: int = 0
    truncated: int = 0
    split: int = 0
    too_long_dropped: int = 0
    short_pieces_dropped: int = 0
    train_pieces: int = 0
    heldout_pieces: int = 0


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def read_documents(data: dict) -> tuple[list[Doc], dict[str, SourceReport]]:
    """Step 1: all kept documents in source order, with a report per source."""
    seen: set[str] = set()
    docs: list[Doc] = []
    reports: dict[str, SourceReport] = {}
    for spec in data["sources"]:
        report = reports[spec["name"]] = SourceReport()
        counts = SourceCounts()
        stream = tqdm(
            read_source(spec, counts, data["bad_lines"], log),
            desc=f"source {spec['name']}",
            unit=" docs",
            mininterval=2,
            leave=False,
        )
        for raw in stream:
            text = normalise(raw.text)
            if len(text) < data["min_chars"]:
                report.empty += 1
                continue
            sha = _sha(text)
            if sha in seen:
                report.duplicate += 1
                continue
            seen.add(sha)
            docs.append(Doc(raw.doc_id, spec["name"], text, sha))
            report.kept += 1
            if spec["max_docs"] is not None and report.kept >= spec["max_docs"]:
                report.capped = True
                break
        stream.close()
        check_bad_lines(spec, counts, data["bad_lines"])
        report.read = counts.as_dict()
        log.info("source %s: %s", spec["name"], report)
        if report.kept == 0:
            raise CorpusError(
                f"data.sources[{spec['name']}]: no usable document ({report.read}, "
                f"{report.empty} empty, {report.duplicate} duplicates)"
            )
    return docs, reports


def split_heldout(docs: list[Doc], data: dict) -> tuple[list[Doc], list[Doc]]:
    """Step 2: (train, heldout), by whole document, ordered by seeded hash."""
    ranked = sorted(docs, key=lambda d: _rank(data["seed"], d.sha))
    fraction, cap = data["heldout"]["fraction"], data["heldout"]["max_docs"]
    n_heldout = max(1, round(fraction * len(docs)))
    if cap is not None:
        n_heldout = min(n_heldout, cap)
    if n_heldout >= len(docs):
        raise CorpusError(
            f"data.heldout: {n_heldout} held-out documents leave none of the {len(docs)} for "
            f"training; lower data.heldout.fraction or add data"
        )
    return ranked[n_heldout:], ranked[:n_heldout]


def apply_weights(train: list[Doc], data: dict) -> list[Doc]:
    """Step 3: round(weight x n) documents per source: whole repeats, then a seeded subsample."""
    out: list[Doc] = []
    for spec in data["sources"]:
        mine = [d for d in train if d.source == spec["name"]]
        target = round(spec["weight"] * len(mine))
        repeats, rest = divmod(target, len(mine)) if mine else (0, 0)
        for r in range(repeats):
            out += [d if r == 0 else Doc(f"{d.doc_id}@{r}", d.source, d.text, d.sha) for d in mine]
        extra = sorted(mine, key=lambda d: _rank(data["seed"], "weight\x00" + d.doc_id))[:rest]
        out += [d if repeats == 0 else Doc(f"{d.doc_id}@{repeats}", d.source, d.text, d.sha) for d in extra]
    return out


def _cut(text: str, limit: int) -> int:
    cut = text.rfind("\n", 0, limit + 1)
    return cut if cut > limit // 2 else limit


def pieces(text: str, limit: int) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` characters, at line ends where possible."""
    out = []
    while len(text) > limit:
        cut = _cut(text, limit)
        out.append(text[:cut].strip())
        text = text[cut:].lstrip("\n")
    out.append(text.strip())
    return [p for p in out if p]


def handle_long(docs: list[Doc], data: dict, reports: dict[str, SourceReport], side: str) -> list[Doc]:
    """Step 4: truncate, split or drop documents over ``max_chars``."""
    limit, mode = data["max_chars"], data["long_docs"]
    out: list[Doc] = []
    for d in docs:
        report = reports[d.source]
        if limit is None or len(d.text) <= limit:
            out.append(d)
        elif mode == "truncate":
            report.truncated += 1
            out.append(Doc(d.doc_id, d.source, d.text[: _cut(d.text, limit)].strip(), d.sha))
        elif mode == "drop":
            report.too_long_dropped += 1
        else:
            report.split += 1
            parts = pieces(d.text, limit)[: data["max_pieces"]]
            for k, part in enumerate(parts):
                if len(part) < data["min_chars"]:
                    report.short_pieces_dropped += 1
                    continue
                out.append(Doc(f"{d.doc_id}#{k}", d.source, part, d.sha))
    for d in out:
        setattr(reports[d.source], f"{side}_pieces", getattr(reports[d.source], f"{side}_pieces") + 1)
    return out


def assign_shards(train: list[Doc], n_shards: int, seed: int) -> list[list[Doc]]:
    """Step 5: seeded-hash order, dealt round-robin."""
    ordered = sorted(train, key=lambda d: _rank(seed, "shard\x00" + d.doc_id))
    shards = [ordered[i::n_shards] for i in range(n_shards)]
    if not shards[-1]:
        raise CorpusError(
            f"data.n_shards={n_shards} but only {len(ordered)} training documents; lower data.n_shards or add data"
        )
    return shards


def build_corpus(data: dict, corpus_path: str | Path, manifest_path: str | Path) -> dict:
    """Run steps 1-5 and write the corpus Parquet file and the data manifest (both atomically)."""
    docs, reports = read_documents(data)
    train, heldout = split_heldout(docs, data)
    for d in train:
        reports[d.source].train += 1
    for d in heldout:
        reports[d.source].heldout += 1
    train = apply_weights(train, data)
    for d in train:
        reports[d.source].train_weighted += 1
    train = handle_long(train, data, reports, "train")
    heldout = handle_long(heldout, data, reports, "heldout")
    if not heldout:
        raise CorpusError("data: every held-out document was dropped as too long; raise data.max_chars")
    shards = assign_shards(train, data["n_shards"], data["seed"])

    meta = {b"kdflow.data_config_hash": config_hash(data).encode()}
    with atomic_path(corpus_path) as tmp:
        with pq.ParquetWriter(tmp, CORPUS_SCHEMA.with_metadata(meta), compression="zstd") as writer:
            for shard_id, rows in [(HELDOUT, heldout)] + list(enumerate(shards)):
                writer.write_table(
                    pa.table(
                        {
                            "shard": pa.array([shard_id] * len(rows), pa.int32()),
                            "doc_id": [d.doc_id for d in rows],
                            "source": [d.source for d in rows],
                            "text": [d.text for d in rows],
                        },
                        schema=CORPUS_SCHEMA,
                    )
                )
    manifest = {
        "data_config_hash": config_hash(data),
        "documents": {
            "kept": len(docs),
            "train_pieces": len(train),
            "heldout_pieces": len(heldout),
            "train_chars": sum(len(d.text) for d in train),
            "heldout_chars": sum(len(d.text) for d in heldout),
        },
        "shards": {shard_name(i): len(rows) for i, rows in enumerate(shards)} | {"heldout": len(heldout)},
        "sources": {name: vars(r) for name, r in reports.items()},
        "python_stdlib": sysconfig.get_paths()["stdlib"],
        "python_version": sys.version.split()[0],
        "provenance": provenance(),
    }
    write_json(manifest_path, manifest)
    log.info(
        "corpus: %d documents kept, %d training pieces in %d shards, %d held out",
        len(docs),
        len(train),
        len(shards),
        len(heldout),
    )
    return manifest


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"

"""Compare the outputs of two runs of one study: the check a refactor passes to show it changed no behaviour.

    python bench/same_outputs.py BEFORE_DIR AFTER_DIR

Each directory is a workflow directory in which ``snakemake --cores all`` finished (``results/`` and
``resources/`` inside). Compared:

- shards and the corpus: byte-identical files;
- teacher caches (every ``results/cache/**.parquet``): identical columns and row groups, and identical file
  metadata apart from the keys that record where and when it was made (the git commit);
- adapters (``results/train/<run>/*.safetensors``): byte-identical;
- ``results/summary.csv``: identical values, cell by cell (it holds no timings);
- eval records (``results/eval/**.json``): identical metrics.

Each difference is printed on its own line; the last line is one JSON object: ``same`` (bool) and the count of
each kind compared (``shard_files``, ``cache_files``, ``adapter_files``, ``eval_records``, ``summary_cells``).
The exit status is 0 only when everything compared is the same.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

# cache metadata keys that record the checkout, not the data
PROVENANCE_META = {"git_commit", "kdflow_version"}


def _files(root: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.glob(pattern)) if p.is_file()}


def _pair(before: Path, after: Path, pattern: str, differences: list[str]) -> list[tuple[str, Path, Path]]:
    a, b = _files(before, pattern), _files(after, pattern)
    for name in sorted(set(a) ^ set(b)):
        differences.append(f"{name}: only in {'before' if name in a else 'after'}")
    return [(name, a[name], b[name]) for name in sorted(set(a) & set(b))]


def _meta(path: Path) -> dict:
    raw = pq.ParquetFile(path).schema_arrow.metadata or {}
    return {k.decode(): v for k, v in raw.items() if k.decode().removeprefix("kdflow.") not in PROVENANCE_META}


def compare(before: Path, after: Path) -> dict:
    differences: list[str] = []
    compared: dict[str, int] = {}

    files = _pair(before, after, "results/shards/*.parquet", differences)
    files += _pair(before, after, "results/data/corpus.parquet", differences)
    for name, a, b in files:
        if a.read_bytes() != b.read_bytes():
            differences.append(f"{name}: bytes differ")
    compared["shard_files"] = len(files)

    caches = _pair(before, after, "results/cache/*/*/*.parquet", differences)
    for name, a, b in caches:
        fa, fb = pq.ParquetFile(a), pq.ParquetFile(b)
        if fa.metadata.num_row_groups != fb.metadata.num_row_groups:
            differences.append(f"{name}: {fa.metadata.num_row_groups} vs {fb.metadata.num_row_groups} row groups")
        ta, tb = fa.read(), fb.read()
        if ta.schema.remove_metadata() != tb.schema.remove_metadata():
            differences.append(f"{name}: columns differ")
        elif not ta.equals(tb):
            bad = [c for c in ta.column_names if not ta[c].equals(tb[c])]
            differences.append(f"{name}: values differ in {bad}")
        ma, mb = _meta(a), _meta(b)
        if ma != mb:
            keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
            differences.append(f"{name}: metadata differs in {keys}")
    compared["cache_files"] = len(caches)

    adapters = _pair(before, after, "results/train/*/*.safetensors", differences)
    for name, a, b in adapters:
        if a.read_bytes() != b.read_bytes():
            differences.append(f"{name}: bytes differ")
    compared["adapter_files"] = len(adapters)

    evals = _pair(before, after, "results/eval/*/*.json", differences)
    for name, a, b in evals:
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        if not isinstance(ra, dict) or "metrics" not in ra:
            continue  # lm-eval's raw output: dates, paths and timings
        if ra["metrics"] != rb["metrics"]:
            differences.append(f"{name}: metrics differ")
    compared["eval_records"] = len(evals)

    cells = 0
    for name, a, b in _pair(before, after, "results/summary.csv", differences):
        with open(a, newline="") as fa, open(b, newline="") as fb:
            rows_a, rows_b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
        if len(rows_a) != len(rows_b) or (rows_a and rows_a[0].keys() != rows_b[0].keys()):
            differences.append(f"{name}: different rows or columns")
            continue
        for i, (ra, rb) in enumerate(zip(rows_a, rows_b, strict=True)):
            for column, value in ra.items():
                cells += 1
                if value != rb[column]:
                    differences.append(f"{name}: row {i} {column}: {value!r} vs {rb[column]!r}")
    compared["summary_cells"] = cells
    return {"same": not differences, "compared": compared, "differences": differences}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    for d in (args.before, args.after):
        if not (d / "results").is_dir():
            parser.error(f"{d}: no results/ directory; run the study there first")
    result = compare(args.before, args.after)
    for line in result["differences"]:
        print(line)
    print(json.dumps(result["compared"] | {"same": result["same"]}, sort_keys=True))
    return 0 if result["same"] else 1


if __name__ == "__main__":
    sys.exit(main())

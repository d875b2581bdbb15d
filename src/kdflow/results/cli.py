"""``python -m kdflow.results``: :func:`~kdflow.results.build.build_results` from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kdflow.results.build import build_results
from kdflow.results.checks import ResultsError


def main(argv: list[str] | None = None) -> int:
    package = sys.modules[__package__]  # kdflow.results, loaded before its submodules: its docstring is the --help
    ap = argparse.ArgumentParser(
        prog="python -m kdflow.results",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--eval", nargs="*", default=[], help="evaluation JSON files")
    ap.add_argument("--train", nargs="*", default=[], help="training run directories")
    ap.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark TSV files")
    ap.add_argument("--telemetry", nargs="*", default=[], help="telemetry JSON-lines files")
    ap.add_argument("--benchmarks-dir", help="read every *.tsv below this folder too (results/benchmarks)")
    ap.add_argument("--telemetry-dir", help="read every *.jsonl below this folder too (results/telemetry)")
    ap.add_argument("--expected", help='JSON file {"models": [...], "evaluations": {...}} for the coverage check')
    ap.add_argument("--db", default="results/kdflow.duckdb")
    ap.add_argument("--csv", default="results/summary.csv")
    ap.add_argument("--md", default="results/summary.md")
    ap.add_argument("--plots", default="results/plots")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    expected = json.loads(Path(args.expected).read_text(encoding="utf-8")) if args.expected else None
    try:
        build_results(
            args.eval,
            args.train,
            args.benchmarks,
            expected,
            args.db,
            args.csv,
            args.md,
            args.plots,
            args.telemetry,
            benchmarks_dir=args.benchmarks_dir,
            telemetry_dir=args.telemetry_dir,
        )
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

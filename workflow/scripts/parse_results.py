"""Rule parse_results: every eval JSON, training run, benchmark and telemetry file into results/kdflow.duckdb,
the summary (CSV, Markdown) and the plots (kdflow.results; docs/results.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

import logging

from kdflow.logs import run_logged
from kdflow.results import build_results

sm = snakemake  # noqa: F821


def main():
    benchmarks = sorted(Path(sm.params.benchmarks).rglob("*.tsv"))
    telemetry = sorted(Path(sm.params.telemetry).rglob("*.jsonl"))
    out = build_results(
        list(sm.input.evals),
        list(sm.input.runs),
        benchmarks,
        dict(sm.params.expected),
        sm.output.db,
        sm.output.csv,
        sm.output.md,
        sm.output.plots,
        telemetry_files=telemetry,
    )
    logging.getLogger("kdflow.results").info(
        "wrote %s, %s, %s and %d plots", out["database"], out["csv"], out["markdown"], len(out["plots"])
    )


run_logged(sm.log[0], main)

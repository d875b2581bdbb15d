"""Rule parse_results: every eval JSON, training run, benchmark and telemetry file into results/kdflow.duckdb,
the summary (CSV, Markdown) and the plots (kdflow.results; docs/results.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

from kdflow.logs import run_logged
from kdflow.results import build_results

sm = snakemake  # noqa: F821


def main():
    build_results(
        list(sm.input.evals),
        list(sm.input.runs),
        expected=dict(sm.params.expected),
        db_path=sm.output.db,
        csv_path=sm.output.csv,
        md_path=sm.output.md,
        plots_dir=sm.output.plots,
        benchmarks_dir=sm.params.benchmarks,
        telemetry_dir=sm.params.telemetry,
    )


run_logged(sm.log[0], main)

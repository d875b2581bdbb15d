"""All of it: read, check, summarise, then write every output asked for."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdflow.results.checks import validate
from kdflow.results.database import write_database
from kdflow.results.plots import make_plots
from kdflow.results.readers import collect
from kdflow.results.report import write_summary_csv, write_summary_md
from kdflow.results.stats import summarize

log = logging.getLogger("kdflow.results")


def _with_found(files: Iterable[str | Path], folder: str | Path | None, pattern: str) -> list[str | Path]:
    """``files`` and every file matching ``pattern`` anywhere below ``folder`` that is not among them."""
    files = list(files)
    if folder is None:
        return files
    given = {str(f) for f in files}
    return files + [p for p in sorted(Path(folder).rglob(pattern)) if str(p) not in given]


def build_results(
    eval_files: Iterable[str | Path],
    train_dirs: Iterable[str | Path] = (),
    benchmark_files: Iterable[str | Path] = (),
    expected: dict | None = None,
    db_path: str | Path | None = None,
    csv_path: str | Path | None = None,
    md_path: str | Path | None = None,
    plots_dir: str | Path | None = None,
    telemetry_files: Iterable[str | Path] = (),
    *,
    benchmarks_dir: str | Path | None = None,
    telemetry_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Read, check (:class:`ResultsError` before anything is written), then write every output given.

    ``expected``: ``{"models": [ids], "evaluations": {evaluation: [tasks]}}``, or None to skip the coverage
    check. An output given as None is not written. ``benchmarks_dir`` / ``telemetry_dir`` (the rule's
    ``results/benchmarks``, ``results/telemetry``): every ``*.tsv`` / ``*.jsonl`` file below them is read too (none
    when the folder does not exist yet). Returns ``{"database", "csv", "markdown", "plots" (PNG paths),
    "summary" (:class:`Summary`)}``.
    """
    benchmark_files = _with_found(benchmark_files, benchmarks_dir, "*.tsv")
    telemetry_files = _with_found(telemetry_files, telemetry_dir, "*.jsonl")
    c = collect(eval_files, train_dirs, benchmark_files, telemetry_files)
    validate(c, expected)
    s = summarize(c)
    out: dict[str, Any] = {"database": None, "csv": None, "markdown": None, "plots": [], "summary": s}
    if db_path is not None:
        out["database"] = write_database(c, s, db_path)
    if csv_path is not None:
        out["csv"] = write_summary_csv(s, csv_path, c)
    if md_path is not None:
        out["markdown"] = write_summary_md(s, c, md_path)
    if plots_dir is not None:
        out["plots"] = make_plots(c, s, plots_dir)
    log.info(
        "results: %d models, %d metrics, %d training runs, %d jobs, %d telemetry files -> %s, %s, %s, %d plots",
        len({ev.model for ev in c.evals}),
        sum(len(ev.metrics) for ev in c.evals),
        len(c.train),
        len(c.jobs),
        len(c.energy),
        db_path,
        csv_path,
        md_path,
        len(out["plots"]),
    )
    return out

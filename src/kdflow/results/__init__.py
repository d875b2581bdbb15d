"""The results: every evaluation, training log, job benchmark and telemetry file in one DuckDB database, a
summary, plots.

:func:`build_results` reads

* the evaluation files ``results/eval/<model>/<evaluation>.json`` (``heldout``, ``lm_eval``; one per evaluated
  model: the runs, the teacher, ``<student>.init``), each a :class:`kdflow.eval_record.EvalRecord`,
* the training run directories ``results/train/<run>/`` (``run_config.json``, ``metrics.jsonl``,
  ``summary.json``),
* the Snakemake benchmark files ``results/benchmarks/<rule>/<name>.tsv``,
* the telemetry files of the GPU rules ``results/telemetry/<rule>/<job>.jsonl`` (:mod:`kdflow.telemetry`)
  (given one by one, or as the folders ``--benchmarks-dir`` / ``--telemetry-dir`` to search),

checks them (:func:`validate`: finite values, accuracies in [0, 1], perplexities >= 1, bits per byte and
NLL >= 0, KL >= -1e-3, and that every expected model has every expected evaluation and task) and writes,
each atomically and only once everything checked out:

* the DuckDB database (tables ``runs``, ``metrics``, ``train_steps``, ``jobs``, ``telemetry``, ``energy``,
  ``summary``; :data:`TABLES` holds their columns, also stored as DuckDB comments),
* ``summary.csv`` (one row per run group and per baseline, columns per metric) and ``summary.md`` (one table
  per evaluation task, best marked, deltas against no-KD and the teacher; time, energy and memory per stage),
* PNG plots (training curves, metric bars, KD-vs-no-KD deltas).

``docs/results.md`` documents the tables, the summary layout and how to query the database.
Command line: ``python -m kdflow.results --help``.
"""

from kdflow.results.build import build_results
from kdflow.results.checks import ResultsError, validate
from kdflow.results.cli import main
from kdflow.results.database import write_database
from kdflow.results.metric_kinds import infer_higher_is_better, metric_class
from kdflow.results.plots import make_plots
from kdflow.results.readers import (
    Collected,
    EvalFile,
    TrainRun,
    collect,
    group_of,
    load_benchmark,
    load_eval,
    load_train_dir,
)
from kdflow.results.report import summary_markdown, write_summary_csv, write_summary_md
from kdflow.results.stats import Cell, Key, Row, Summary, cell_stats, mean_stderr, summarize
from kdflow.results.tables import TABLES

__all__ = [
    "TABLES",
    "Cell",
    "Collected",
    "EvalFile",
    "Key",
    "ResultsError",
    "Row",
    "Summary",
    "TrainRun",
    "build_results",
    "cell_stats",
    "collect",
    "group_of",
    "infer_higher_is_better",
    "load_benchmark",
    "load_eval",
    "load_train_dir",
    "main",
    "make_plots",
    "mean_stderr",
    "metric_class",
    "summarize",
    "summary_markdown",
    "validate",
    "write_database",
    "write_summary_csv",
    "write_summary_md",
]

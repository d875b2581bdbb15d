"""Reading the inputs: evaluation files, training run directories, Snakemake benchmark files and (with
:func:`kdflow.telemetry.load_telemetry`) telemetry files, into one :class:`Collected`.

A reader never raises on a bad file: it appends the problem, naming the file and what to do, to a list that
:func:`kdflow.results.checks.validate` reports all at once.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdflow.eval_record import EvalRecord, EvalRecordError, Metric
from kdflow.results.tables import STEP_COLUMNS
from kdflow.runs import run_group
from kdflow.telemetry import load_telemetry

BENCH_FIELDS = {
    "s": "seconds",
    "max_rss": "max_rss_mb",
    "max_vms": "max_vms_mb",
    "max_uss": "max_uss_mb",
    "max_pss": "max_pss_mb",
    "io_in": "io_in",
    "io_out": "io_out",
    "mean_load": "mean_load",
    "cpu_time": "cpu_time",
}  # benchmark TSV column -> jobs column
MISSING_MARKS = {"", "NA", "-", "N/A"}


@dataclass(frozen=True)
class EvalFile:
    """One evaluation file: where it was read and its record (the model's identity and its metrics)."""

    path: str
    record: EvalRecord

    @property
    def model(self) -> str:
        return self.record.model

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def student(self) -> str | None:
        return self.record.student

    @property
    def mode(self) -> str | None:
        return self.record.mode

    @property
    def seed(self) -> int | None:
        return self.record.seed

    @property
    def tag(self) -> str | None:
        return self.record.tag

    @property
    def evaluation(self) -> str:
        return self.record.evaluation

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return self.record.metrics


@dataclass
class TrainRun:
    """One training run directory: its spec (run_config.json), summary.json and one dict per step."""

    path: str
    name: str
    spec: dict
    summary: dict
    steps: list[dict]


@dataclass
class Collected:
    """Every input read, as table rows where the tables take them as they are, and every problem found."""

    evals: list[EvalFile] = field(default_factory=list)
    train: list[TrainRun] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)
    telemetry: list[dict] = field(default_factory=list)
    energy: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def rerun_hint(path: str | Path) -> str:
    """What to do about a bad input file: rebuild it."""
    return f"rerun `snakemake {path} --force`"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def group_of(model: str, kind: str, student: str | None, mode: str | None, tag: str | None) -> str:
    """The summary row a model belongs to: ``<student>.<mode>[.<tag>]`` for a run, its own id otherwise."""
    return run_group(student, mode, tag) if kind == "run" else model


def load_eval(path: str | Path, problems: list[str]) -> EvalFile | None:
    """One evaluation file (an :class:`~kdflow.eval_record.EvalRecord`); every fault is appended to ``problems``,
    naming the file and what to do. None when the file is unusable; with faulty metric entries only, the rest of
    the file (so that its other values are still checked)."""
    p = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{p}: file not found; run `snakemake {p}`")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{p}: not valid JSON ({e}); {rerun_hint(p)}")
        return None
    try:
        return EvalFile(p, EvalRecord.from_json(data))
    except EvalRecordError as e:
        problems += [f"{p}: {problem}; {rerun_hint(p)}" for problem in e.problems]
        return None if e.partial is None else EvalFile(p, e.partial)


def load_train_dir(path: str | Path, problems: list[str]) -> TrainRun | None:
    """One training run directory: its spec (run_config.json), summary.json (optional) and metrics.jsonl."""
    d = Path(path)
    cfg_file = d / "run_config.json"
    try:
        spec = json.loads(cfg_file.read_text(encoding="utf-8"))["spec"]
        name = spec["name"]
    except FileNotFoundError:
        problems.append(f"{d}: no run_config.json (not a finished training run); run `snakemake {d}`")
        return None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        problems.append(f"{cfg_file}: unreadable or without spec.name ({e!r}); {rerun_hint(d)}")
        return None
    summary: dict = {}
    if (d / "summary.json").is_file():
        try:
            summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            problems.append(f"{d / 'summary.json'}: not valid JSON ({e}); {rerun_hint(d)}")
    steps: list[dict] = []
    metrics_file = d / "metrics.jsonl"
    if not metrics_file.is_file():
        problems.append(f"{metrics_file}: missing (run {name}); {rerun_hint(d)}")
        return None
    for n, line in enumerate(metrics_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            problems.append(f"{metrics_file}:{n}: not a step record ({e!r}); {rerun_hint(d)}")
            return None
        out = {"model": name}
        for col in STEP_COLUMNS[1:]:
            v = row.get(col)
            if v is not None and (not _is_number(v) or not math.isfinite(float(v))):
                problems.append(
                    f"{metrics_file}:{n}: run {name}, step {row['step']}: {col} = {v!r} is not a finite "
                    f"number; {rerun_hint(d)}"
                )
                v = None
            out[col] = v
        steps.append(out)
    return TrainRun(str(d), name, spec, summary, steps)


def _bench_value(raw: str, path: str, column: str, problems: list[str]) -> float | None:
    raw = (raw or "").strip()
    if raw in MISSING_MARKS:
        return None
    try:
        v = float(raw)
    except ValueError:
        problems.append(f"{path}: column {column} = {raw!r} is not a number; rerun the job or delete the file")
        return None
    if not math.isfinite(v):
        return None
    return v


def load_benchmark(path: str | Path, problems: list[str]) -> list[dict]:
    """Rows of one Snakemake benchmark TSV: rule = its folder (file stem when directly in benchmarks/)."""
    p = Path(path)
    rule = p.stem if p.parent.name == "benchmarks" else p.parent.name
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        problems.append(f"{p}: benchmark file not found")
        return []
    if rows and "s" not in rows[0]:
        problems.append(f"{p}: not a Snakemake benchmark file (no column 's'; header {list(rows[0])})")
        return []
    out = []
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {"rule": rule, "name": p.stem, "repeat": i}
        for col, name in BENCH_FIELDS.items():
            rec[name] = _bench_value(row.get(col), str(p), col, problems)
        rec["source"] = str(p)
        out.append(rec)
    return out


def collect(
    eval_files: Iterable[str | Path],
    train_dirs: Iterable[str | Path] = (),
    benchmark_files: Iterable[str | Path] = (),
    telemetry_files: Iterable[str | Path] = (),
) -> Collected:
    """Read every input (sorted by path, so that the outputs do not depend on the order given)."""
    c = Collected()
    for f in sorted(map(str, eval_files)):
        ev = load_eval(f, c.problems)
        if ev is not None:
            c.evals.append(ev)
    for d in sorted(map(str, train_dirs)):
        run = load_train_dir(d, c.problems)
        if run is not None:
            c.train.append(run)
    for f in sorted(map(str, benchmark_files)):
        c.jobs += load_benchmark(f, c.problems)
    for f in sorted(map(str, telemetry_files)):
        rows, job = load_telemetry(f, c.problems)
        c.telemetry += rows
        if job is not None:
            c.energy.append(job)
    return c

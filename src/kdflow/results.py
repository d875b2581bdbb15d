"""The results: every evaluation, training log, job benchmark and telemetry file in one DuckDB database, a
summary, plots.

:func:`build_results` reads

* the evaluation files ``results/eval/<model>/<evaluation>.json`` (``heldout``, ``lm_eval``; one per evaluated
  model: the runs, the teacher, ``<student>.init``),
* the training run directories ``results/train/<run>/`` (``run_config.json``, ``metrics.jsonl``,
  ``summary.json``),
* the Snakemake benchmark files ``results/benchmarks/<rule>/<name>.tsv``,
* the telemetry files of the GPU rules ``results/telemetry/<rule>/<job>.jsonl`` (:mod:`kdflow.telemetry`),

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

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from kdflow.atomic import atomic_path
from kdflow.telemetry import EnergyMeter

log = logging.getLogger("kdflow.results")

KINDS = ("run", "teacher", "student_init")
NO_KD_MODE = "ce"
KL_TOLERANCE = 1e-3  # KL against a float16 teacher cache may be a hair below 0 (the teacher against its own cache)
MAX_PROBLEMS = 40    # problems listed in one ResultsError message
TRAIN_TERMS = ("loss", "ce", "rb", "fb", "relb")  # plotted training curves, in this order

# --------------------------------------------------------------------------- the tables

# {table: (comment, [(column, DuckDB type, comment), ...])}: the DDL, the DuckDB comments and docs/results.md.
TABLES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "runs": ("one row per evaluated model (runs, teacher, student init) and per training run directory", [
        ("model", "VARCHAR", "model id: run name <student>.<mode>.s<seed>[.<tag>], the teacher's name, <student>.init"),
        ("kind", "VARCHAR", "run | teacher | student_init"),
        ("student", "VARCHAR", "student name (NULL for the teacher)"),
        ("mode", "VARCHAR", "training mode (runs only)"),
        ("seed", "INTEGER", "seed (runs only)"),
        ("tag", "VARCHAR", "experiment tag (runs only, NULL without one)"),
        ("run_group", "VARCHAR", "the run name without its seed: <student>.<mode>[.<tag>]; baselines: their model id"),
        ("terms", "VARCHAR", "loss weights as JSON text, e.g. {\"ce\": 0.5, \"rb\": 0.5} (runs with a training directory)"),
        ("steps", "INTEGER", "optimiser steps trained"),
        ("tokens", "BIGINT", "student tokens trained on"),
        ("train_seconds", "DOUBLE", "seconds in training steps (summary.json train_seconds)"),
        ("final_loss", "DOUBLE", "training loss, mean of the last 5 steps (summary.json final.loss)"),
        ("evaluated", "BOOLEAN", "whether the model has evaluation files"),
        ("train_dir", "VARCHAR", "the training run directory read (NULL: none given)"),
    ]),
    "metrics": ("one row per metric of an evaluation file", [
        ("model", "VARCHAR", "model id (runs.model)"),
        ("evaluation", "VARCHAR", "heldout | lm_eval"),
        ("task", "VARCHAR", "task, e.g. heldout, kdflow_heldout, arc_easy"),
        ("metric", "VARCHAR", "metric, e.g. ppl, nll_per_token, top1_agreement, kl_teacher_student, word_perplexity, acc"),
        ("value", "DOUBLE", "the value (NULL: not applicable to this model)"),
        ("stderr", "DOUBLE", "the evaluation's own standard error (NULL: not computed)"),
        ("higher_is_better", "BOOLEAN", "direction as the evaluation file gives it (NULL: not given)"),
        ("source", "VARCHAR", "the evaluation file"),
    ]),
    "train_steps": ("one row per optimiser step of a training run (metrics.jsonl); NULL where the run does not log it", [
        ("model", "VARCHAR", "run name (runs.model)"),
        ("step", "INTEGER", "optimiser step, from 1"),
        ("epoch", "INTEGER", "data epoch, from 0"),
        ("loss", "DOUBLE", "weighted sum of the terms"),
        ("ce", "DOUBLE", "cross-entropy term (nats per token)"),
        ("rb", "DOUBLE", "response-based (logit) KD term"),
        ("fb", "DOUBLE", "feature-based KD term"),
        ("relb", "DOUBLE", "relation-based KD term"),
        ("relb_distance", "DOUBLE", "RKD distance part of relb"),
        ("relb_angle", "DOUBLE", "RKD angle part of relb"),
        ("lr", "DOUBLE", "learning rate of the step"),
        ("grad_norm", "DOUBLE", "gradient norm before clipping"),
        ("tokens", "BIGINT", "student tokens in the step (all ranks)"),
        ("docs", "INTEGER", "documents in the step (all ranks)"),
        ("tokens_per_s", "DOUBLE", "tokens per second of the step"),
        ("step_s", "DOUBLE", "seconds of the step"),
        ("elapsed_s", "DOUBLE", "seconds of training so far (over resumes)"),
    ]),
    "jobs": ("one row per Snakemake benchmark file (per repeat)", [
        ("rule", "VARCHAR", "the rule: the benchmark file's folder under results/benchmarks (the file stem for a file directly in it)"),
        ("name", "VARCHAR", "the file stem: the shard, run or model of the job"),
        ("repeat", "INTEGER", "row of the file, from 0 (benchmark repeats)"),
        ("seconds", "DOUBLE", "wall-clock seconds (s)"),
        ("max_rss_mb", "DOUBLE", "peak resident set size, MB"),
        ("max_vms_mb", "DOUBLE", "peak virtual memory, MB"),
        ("max_uss_mb", "DOUBLE", "peak unique set size, MB"),
        ("max_pss_mb", "DOUBLE", "peak proportional set size, MB"),
        ("io_in", "DOUBLE", "MB read"),
        ("io_out", "DOUBLE", "MB written"),
        ("mean_load", "DOUBLE", "mean CPU load, percent of one core"),
        ("cpu_time", "DOUBLE", "CPU seconds (user + system)"),
        ("source", "VARCHAR", "the benchmark file"),
    ]),
    "telemetry": ("one row per telemetry sample and GPU (one row with gpu NULL where a job sampled no GPU)", [
        ("rule", "VARCHAR", "the rule of the job (the file's start line)"),
        ("job", "VARCHAR", "the job: its shard, model or run (jobs.name)"),
        ("sample", "INTEGER", "sample of the job, from 0 (the first is taken at the start, the last at the end)"),
        ("t", "DOUBLE", "Unix time of the sample, s"),
        ("elapsed_s", "DOUBLE", "seconds since the job's telemetry started"),
        ("gpu", "INTEGER", "NVML index of the GPU (NULL: no GPU sampled)"),
        ("power_w", "DOUBLE", "GPU power draw, W"),
        ("energy_j", "DOUBLE", "the GPU's energy counter (since the driver loaded), J; NULL where unsupported"),
        ("mem_used_mb", "DOUBLE", "GPU memory in use (all processes on the GPU), MB"),
        ("util_gpu", "DOUBLE", "GPU utilisation, percent of the last sample period with a kernel running"),
        ("cpu_percent", "DOUBLE", "CPU of the job's processes since the previous sample, percent of one core "
                                  "(NULL in sample 0); repeated on each GPU row of a sample"),
        ("rss_mb", "DOUBLE", "resident memory of the job's processes, MB; repeated on each GPU row of a sample"),
        ("line", "INTEGER", "line of the telemetry file, from 1"),
        ("source", "VARCHAR", "the telemetry file"),
    ]),
    "energy": ("one row per telemetry file: energy, tokens and peak memory of one job", [
        ("rule", "VARCHAR", "the rule of the job"),
        ("job", "VARCHAR", "the job: its shard, model or run (jobs.name)"),
        ("host", "VARCHAR", "the machine it ran on"),
        ("nvml", "BOOLEAN", "whether NVML (GPU telemetry) was available"),
        ("nvml_error", "VARCHAR", "why NVML was unavailable (NULL with NVML)"),
        ("gpus", "INTEGER", "GPUs sampled"),
        ("gpu_names", "VARCHAR", "their names, comma-separated (NULL: none)"),
        ("samples", "INTEGER", "sample lines"),
        ("complete", "BOOLEAN", "the file has its end line and the job's work succeeded (false: killed or failed)"),
        ("elapsed_s", "DOUBLE", "seconds measured (end line; without one, up to the last sample)"),
        ("tokens", "BIGINT", "tokens the job processed, as it reported them (NULL: none reported)"),
        ("energy_j", "DOUBLE", "GPU energy of the job over all its GPUs, J: the energy counters' difference, "
                               "integrated power where a GPU has no counter; NULL without NVML"),
        ("energy_per_token_j", "DOUBLE", "energy_j / tokens, J per token (NULL without energy or tokens)"),
        ("peak_gpu_mem_mb", "DOUBLE", "highest GPU memory in use on any one of its GPUs, MB (NULL: no GPU)"),
        ("peak_rss_mb", "DOUBLE", "highest resident memory of the job's processes, MB"),
        ("source", "VARCHAR", "the telemetry file"),
    ]),
    "summary": ("one row per (summary row, evaluation, task, metric): what summary.csv and summary.md show", [
        ("run_group", "VARCHAR", "run group (runs aggregated over seeds) or baseline model id"),
        ("kind", "VARCHAR", "run | teacher | student_init"),
        ("student", "VARCHAR", "student name (NULL for the teacher)"),
        ("mode", "VARCHAR", "training mode (run groups only)"),
        ("tag", "VARCHAR", "experiment tag (run groups only)"),
        ("evaluation", "VARCHAR", "heldout | lm_eval"),
        ("task", "VARCHAR", "task"),
        ("metric", "VARCHAR", "metric"),
        ("higher_is_better", "BOOLEAN", "direction used for best and deltas (the files' value, else from the metric name; NULL: unknown)"),
        ("n", "INTEGER", "seeds (models) with a value"),
        ("mean", "DOUBLE", "mean over the seeds (NULL: not applicable)"),
        ("stderr", "DOUBLE", "sample standard deviation / sqrt(n) over the seeds (NULL with one seed)"),
        ("best", "BOOLEAN", "the best student row for this metric (teacher excluded; ties all marked; NULL: unknown direction)"),
        ("ce_group", "VARCHAR", "the no-KD group of the same student and tag (run groups of another mode only)"),
        ("delta_ce", "DOUBLE", "mean - mean of ce_group"),
        ("delta_ce_stderr", "DOUBLE", "sqrt(stderr^2 + stderr of ce_group^2); NULL when either has one seed"),
        ("teacher", "VARCHAR", "the teacher's model id"),
        ("delta_teacher", "DOUBLE", "mean - the teacher's value"),
        ("delta_teacher_stderr", "DOUBLE", "stderr of this row (the teacher's value is one number)"),
    ]),
}
TELEMETRY_GPU_FIELDS = ("power_w", "energy_j", "mem_used_mb", "util_gpu")

STEP_COLUMNS = [c for c, _, _ in TABLES["train_steps"][1]]
BENCH_FIELDS = {"s": "seconds", "max_rss": "max_rss_mb", "max_vms": "max_vms_mb", "max_uss": "max_uss_mb",
                "max_pss": "max_pss_mb", "io_in": "io_in", "io_out": "io_out", "mean_load": "mean_load",
                "cpu_time": "cpu_time"}
MISSING_MARKS = {"", "NA", "-", "N/A"}


class ResultsError(ValueError):
    """Evaluation results that are missing, malformed or out of range; the message names file, model, metric."""


# --------------------------------------------------------------------------- metric kinds

def metric_class(metric: str) -> str | None:
    """``accuracy`` ([0, 1]), ``perplexity`` (>= 1), ``nonnegative`` (>= 0), ``kl`` (>= -1e-3) or None."""
    base = metric.split(",")[0].strip().lower()
    if base.startswith("acc") or base.startswith("exact_match") or "agreement" in base:
        return "accuracy"
    if base == "ppl" or base.startswith("ppl_") or "perplexity" in base:
        return "perplexity"
    if base.startswith("kl") or "_kl" in base:
        return "kl"
    if base.startswith("bits_per_byte") or base.startswith("nll") or base.startswith("bpb"):
        return "nonnegative"
    return None


def infer_higher_is_better(metric: str) -> bool | None:
    """The direction of a metric from its name, where a file does not give it."""
    kind = metric_class(metric)
    if kind == "accuracy":
        return True
    if kind in ("perplexity", "kl", "nonnegative"):
        return False
    return None


# --------------------------------------------------------------------------- reading

@dataclass
class EvalFile:
    path: str
    model: str
    kind: str
    student: str | None
    mode: str | None
    seed: int | None
    tag: str | None
    evaluation: str
    metrics: list[dict]  # {"task", "metric", "value", "stderr", "higher_is_better"}


@dataclass
class TrainRun:
    path: str
    name: str
    spec: dict
    summary: dict
    steps: list[dict]


@dataclass
class Collected:
    evals: list[EvalFile] = field(default_factory=list)
    train: list[TrainRun] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)
    telemetry: list[dict] = field(default_factory=list)
    energy: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _rerun(path: str | Path) -> str:
    return f"rerun `snakemake {path} --force`"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: float) -> bool:
    return math.isfinite(x)


def group_of(model: str, kind: str, student: str | None, mode: str | None, tag: str | None) -> str:
    """The summary row a model belongs to: ``<student>.<mode>[.<tag>]`` for a run, its own id otherwise."""
    if kind != "run":
        return model
    return f"{student}.{mode}" + (f".{tag}" if tag else "")


def load_eval(path: str | Path, problems: list[str]) -> EvalFile | None:
    """One evaluation file; structural problems are appended to ``problems`` (then None)."""
    p = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{p}: file not found; run `snakemake {p}`")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{p}: not valid JSON ({e}); {_rerun(p)}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{p}: expected a JSON object, found {type(data).__name__}; {_rerun(p)}")
        return None
    missing = [k for k in ("model", "kind", "evaluation", "metrics") if k not in data]
    if missing:
        problems.append(f"{p}: missing key(s) {missing}; {_rerun(p)}")
        return None
    model, kind = data["model"], data["kind"]
    if not isinstance(model, str) or not model:
        problems.append(f"{p}: \"model\" is {model!r}, expected the model id; {_rerun(p)}")
        return None
    if kind not in KINDS:
        problems.append(f"{p}: model {model}: kind {kind!r} is none of {list(KINDS)}; {_rerun(p)}")
        return None
    ev = EvalFile(p, model, kind, data.get("student"), data.get("mode"), data.get("seed"), data.get("tag"),
                  str(data["evaluation"]), [])
    if kind == "run":
        if not ev.student or not ev.mode or not isinstance(ev.seed, int) or isinstance(ev.seed, bool):
            problems.append(f"{p}: model {model}: a run needs student, mode and an integer seed, found student="
                            f"{ev.student!r} mode={ev.mode!r} seed={ev.seed!r}; {_rerun(p)}")
            return None
        expected_name = f"{ev.student}.{ev.mode}.s{ev.seed}" + (f".{ev.tag}" if ev.tag else "")
        if expected_name != model:
            problems.append(f"{p}: model {model}: student/mode/seed/tag say the run is {expected_name!r}; "
                            f"{_rerun(p)}")
            return None
    if not isinstance(data["metrics"], list):
        problems.append(f"{p}: model {model}: \"metrics\" is not a list; {_rerun(p)}")
        return None
    for i, m in enumerate(data["metrics"]):
        if not isinstance(m, dict) or not isinstance(m.get("task"), str) or not isinstance(m.get("metric"), str):
            problems.append(f"{p}: model {model}: metrics[{i}] = {m!r} lacks a task or metric name; {_rerun(p)}")
            continue
        value, stderr, hib = m.get("value"), m.get("stderr"), m.get("higher_is_better")
        where = f"{p}: model {model}, task {m['task']}, metric {m['metric']}"
        if value is not None and not _is_number(value):
            problems.append(f"{where}: value {value!r} is not a number; {_rerun(p)}")
            continue
        if isinstance(stderr, str) and stderr.strip().upper() in MISSING_MARKS:
            stderr = None  # lm-eval writes "N/A" where it computed none
        if stderr is not None and not _is_number(stderr):
            problems.append(f"{where}: stderr {stderr!r} is not a number; {_rerun(p)}")
            continue
        if hib is not None and not isinstance(hib, bool):
            problems.append(f"{where}: higher_is_better {hib!r} is not true/false/null; {_rerun(p)}")
            continue
        ev.metrics.append({"task": m["task"], "metric": m["metric"],
                           "value": None if value is None else float(value),
                           "stderr": None if stderr is None else float(stderr), "higher_is_better": hib})
    return ev


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
        problems.append(f"{cfg_file}: unreadable or without spec.name ({e!r}); {_rerun(d)}")
        return None
    summary: dict = {}
    if (d / "summary.json").is_file():
        try:
            summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            problems.append(f"{d / 'summary.json'}: not valid JSON ({e}); {_rerun(d)}")
    steps: list[dict] = []
    metrics_file = d / "metrics.jsonl"
    if not metrics_file.is_file():
        problems.append(f"{metrics_file}: missing (run {name}); {_rerun(d)}")
        return None
    for n, line in enumerate(metrics_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            problems.append(f"{metrics_file}:{n}: not a step record ({e!r}); {_rerun(d)}")
            return None
        out = {"model": name}
        for col in STEP_COLUMNS[1:]:
            v = row.get(col)
            if v is not None and (not _is_number(v) or not _finite(float(v))):
                problems.append(f"{metrics_file}:{n}: run {name}, step {row['step']}: {col} = {v!r} is not a finite "
                                f"number; {_rerun(d)}")
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
    if not _finite(v):
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


def _opt_number(record: dict, key: str) -> bool:
    v = record.get(key)
    return v is None or (_is_number(v) and _finite(float(v)))


def _max(*values: float | None) -> float | None:
    present = [float(v) for v in values if v is not None]
    return max(present) if present else None


def load_telemetry(path: str | Path, problems: list[str]) -> tuple[list[dict], dict | None]:
    """One telemetry file (:mod:`kdflow.telemetry`): its sample rows and its job's energy row (None if unreadable).

    A file without its end line (a killed job) still counts, with ``complete`` false: its elapsed time and
    energy are taken from the samples.
    """
    p = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        problems.append(f"{p}: telemetry file not found")
        return [], None
    except UnicodeDecodeError as e:
        problems.append(f"{p}: not UTF-8 text ({e}); delete it or rerun the job")
        return [], None
    start: dict | None = None
    end: dict | None = None
    rows: list[dict] = []
    meter = EnergyMeter()
    samples = 0
    last_elapsed: float | None = None
    peak_mem: float | None = None
    peak_rss: float | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        fix = f"delete {p} or rerun its job" + (f" ({start['rule']} {start['job']})" if start else "")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e}); {fix}")
            return [], None
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if start is None:
            if kind != "start" or not isinstance(rec.get("rule"), str) or not isinstance(rec.get("job"), str):
                problems.append(f"{where}: the first line of a telemetry file must be its start line (kind "
                                f"start, with rule and job), found {line[:80]!r}; {fix}")
                return [], None
            start = rec
            continue
        if end is not None:
            problems.append(f"{where}: a line after the end line; {fix}")
            return [], None
        if kind == "sample":
            gpus = rec.get("gpus", [])
            bad = [k for k in ("elapsed_s", "t") if not _is_number(rec.get(k))]
            bad += [k for k in ("cpu_percent", "rss_mb") if not _opt_number(rec, k)]
            if not isinstance(gpus, list) or not all(
                    isinstance(g, dict) and isinstance(g.get("index"), int) and not isinstance(g["index"], bool)
                    for g in gpus):
                bad.append("gpus")
            else:
                bad += [f"gpus[{i}].{k}" for i, g in enumerate(gpus) for k in TELEMETRY_GPU_FIELDS
                        if not _opt_number(g, k)]
            if bad:
                problems.append(f"{where}: sample with missing or non-numeric {', '.join(bad)}; {fix}")
                return [], None
            base = {"rule": start["rule"], "job": start["job"], "sample": samples, "t": float(rec["t"]),
                    "elapsed_s": float(rec["elapsed_s"]), "cpu_percent": rec.get("cpu_percent"),
                    "rss_mb": rec.get("rss_mb"), "line": n, "source": p}
            for g in gpus or [None]:
                rows.append({**base, "gpu": None if g is None else g["index"],
                             **{k: None if g is None else g.get(k) for k in TELEMETRY_GPU_FIELDS}})
            meter.add(float(rec["elapsed_s"]), gpus)
            peak_mem = _max(peak_mem, *(g.get("mem_used_mb") for g in gpus))
            peak_rss = _max(peak_rss, rec.get("rss_mb"))
            last_elapsed = float(rec["elapsed_s"])
            samples += 1
        elif kind == "end":
            tokens = rec.get("tokens")
            bad = [k for k in ("elapsed_s",) if not _is_number(rec.get(k))]
            bad += [k for k in ("energy_j",) if not _opt_number(rec, k)]
            if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
                bad.append("tokens")
            if bad:
                problems.append(f"{where}: end line with missing or invalid {', '.join(bad)}; {fix}")
                return [], None
            end = rec
        else:
            problems.append(f"{where}: unknown line kind {kind!r} (expected sample or end); {fix}")
            return [], None
    if start is None:
        problems.append(f"{p}: empty telemetry file; delete it or rerun its job")
        return [], None
    gpu_info = start.get("gpus") or []
    names = [str(g.get("name")) for g in gpu_info if isinstance(g, dict) and g.get("name") is not None]
    energy = end.get("energy_j") if end is not None else meter.total_j()
    tokens = end.get("tokens") if end is not None else None
    job = {"rule": start["rule"], "job": start["job"], "host": start.get("host"), "nvml": bool(start.get("nvml")),
           "nvml_error": start.get("nvml_error"), "gpus": len(gpu_info), "gpu_names": ", ".join(names) or None,
           "samples": samples, "complete": end is not None and end.get("ok", True) is not False,
           "elapsed_s": float(end["elapsed_s"]) if end is not None else last_elapsed, "tokens": tokens,
           "energy_j": None if energy is None else float(energy),
           "energy_per_token_j": float(energy) / tokens if energy is not None and tokens else None,
           "peak_gpu_mem_mb": peak_mem, "peak_rss_mb": peak_rss, "source": p}
    return rows, job


def collect(eval_files: Iterable[str | Path], train_dirs: Iterable[str | Path] = (),
            benchmark_files: Iterable[str | Path] = (), telemetry_files: Iterable[str | Path] = ()) -> Collected:
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


# --------------------------------------------------------------------------- checks

def _eval_root(c: Collected) -> str:
    if c.evals:
        return str(Path(c.evals[0].path).parent.parent)
    return "results/eval"


def validate(c: Collected, expected: dict | None = None) -> None:
    """Raise :class:`ResultsError` listing every problem: reading, consistency, ranges, coverage."""
    problems = list(c.problems)
    seen: dict[tuple[str, str], str] = {}
    identity: dict[str, tuple[EvalFile, tuple]] = {}
    for ev in c.evals:
        key = (ev.model, ev.evaluation)
        if key in seen:
            problems.append(f"{ev.path}: model {ev.model}: a second {ev.evaluation} file (the first is {seen[key]}); "
                            f"pass one file per model and evaluation")
        seen.setdefault(key, ev.path)
        ident = (ev.kind, ev.student, ev.mode, ev.seed, ev.tag)
        if ev.model in identity and identity[ev.model][1] != ident:
            other = identity[ev.model][0]
            problems.append(f"{ev.path}: model {ev.model}: kind/student/mode/seed/tag {ident} differ from {other.path} "
                            f"{identity[ev.model][1]}; {_rerun(ev.path)}")
        identity.setdefault(ev.model, (ev, ident))
        for m in ev.metrics:
            problems += _check_value(ev, m)
    names: dict[str, str] = {}
    for run in c.train:
        if run.name in names:
            problems.append(f"{run.path}: run {run.name} is also read from {names[run.name]}; pass each run once")
        names.setdefault(run.name, run.path)
        if run.name in identity:
            ev, (kind, student, mode, seed, tag) = identity[run.name]
            spec = run.spec
            theirs = (spec.get("student"), spec.get("mode"), spec.get("seed"), spec.get("tag"))
            if kind != "run" or (student, mode, seed, tag) != theirs:
                problems.append(f"{ev.path}: model {ev.model}: (kind, student, mode, seed, tag) = {(kind, student, mode, seed, tag)}"
                                f" but its training run {run.path} has {('run', *theirs)}; {_rerun(ev.path)}")
    if expected:
        problems += _check_coverage(c, expected)
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"\n… and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise ResultsError(f"{len(problems)} problem(s) in the results inputs:\n- " + "\n- ".join(shown) + more)


def _check_value(ev: EvalFile, m: dict) -> list[str]:
    where = f"{ev.path}: model {ev.model}, task {m['task']}, metric {m['metric']}"
    fix = f"the evaluation wrote a wrong value: check its log and {_rerun(ev.path)}"
    out = []
    value, stderr = m["value"], m["stderr"]
    if stderr is not None and (not _finite(stderr) or stderr < 0):
        out.append(f"{where}: stderr = {stderr} is not a finite number >= 0; {fix}")
    if value is None:
        return out  # not applicable to this model
    if not _finite(value):
        return out + [f"{where}: value = {value} is not finite (NaN or inf); {fix}"]
    kind = metric_class(m["metric"])
    if kind == "accuracy" and not 0.0 <= value <= 1.0:
        out.append(f"{where}: value = {value} is outside [0, 1] (an accuracy or agreement); {fix}")
    elif kind == "perplexity" and value < 1.0:
        out.append(f"{where}: value = {value} is below 1 (a perplexity); {fix}")
    elif kind == "nonnegative" and value < 0.0:
        out.append(f"{where}: value = {value} is negative (bits per byte / NLL are >= 0); {fix}")
    elif kind == "kl" and value < -KL_TOLERANCE:
        out.append(f"{where}: value = {value} is below -{KL_TOLERANCE} (a KL divergence; float16 caches allow only "
                   f"tiny negative values); {fix}")
    return out


def _check_coverage(c: Collected, expected: dict) -> list[str]:
    root = _eval_root(c)
    files = {(ev.model, ev.evaluation): ev for ev in c.evals}
    evaluations: dict[str, list[str]] = {k: list(v or []) for k, v in (expected.get("evaluations") or {}).items()}
    out = []
    for model in expected.get("models") or []:
        for evaluation, tasks in evaluations.items():
            ev = files.get((model, evaluation))
            if ev is None:
                target = f"{root}/{model}/{evaluation}.json"
                out.append(f"model {model}: no {evaluation} results ({target} is not among the inputs); run "
                           f"`snakemake {target}`")
                continue
            have = {m["task"] for m in ev.metrics}
            for task in tasks:
                if task not in have:
                    out.append(f"{ev.path}: model {model}, evaluation {evaluation}: no metric for task {task} "
                               f"(tasks present: {sorted(have)}); the config expects it: {_rerun(ev.path)}")
    return out


# --------------------------------------------------------------------------- summary

Key = tuple[str, str, str]  # (evaluation, task, metric)


@dataclass
class Row:
    name: str
    kind: str
    student: str | None
    mode: str | None
    tag: str | None
    models: list[str]
    seeds: list[int]


@dataclass
class Cell:
    n: int = 0
    mean: float | None = None
    stderr: float | None = None
    na: bool = False                 # entries exist but every value is null (not applicable)
    best: bool | None = None
    delta_ce: float | None = None
    delta_ce_stderr: float | None = None
    delta_teacher: float | None = None
    delta_teacher_stderr: float | None = None


@dataclass
class Summary:
    rows: list[Row]
    keys: list[Key]
    labels: dict[Key, str]
    direction: dict[Key, bool | None]
    cells: dict[tuple[str, Key], Cell]
    ce_group: dict[str, str]         # run group -> its no-KD group
    teacher: str | None
    not_applicable: list[tuple[str, Key]]

    def cell(self, row: str, key: Key) -> Cell | None:
        return self.cells.get((row, key))


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)); stderr None with fewer than 2 values."""
    if not values:
        return None, None
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def _row_order(row: Row) -> tuple:
    rank = {"teacher": 0, "student_init": 1, "run": 2}[row.kind]
    return (rank != 0, row.student or "", rank, row.tag or "", row.mode != NO_KD_MODE, row.mode or "", row.name)


def summarize(c: Collected) -> Summary:
    """Aggregate the evaluation metrics over seeds per run group; best rows; deltas vs ce and vs the teacher."""
    rows: dict[str, Row] = {}
    values: dict[tuple[str, Key], list[float | None]] = {}
    given_direction: dict[Key, bool] = {}
    order: dict[tuple[str, str], list[str]] = {}
    for ev in c.evals:
        g = group_of(ev.model, ev.kind, ev.student, ev.mode, ev.tag)
        row = rows.setdefault(g, Row(g, ev.kind, ev.student, ev.mode if ev.kind == "run" else None,
                                     ev.tag if ev.kind == "run" else None, [], []))
        if ev.model not in row.models:
            row.models.append(ev.model)
            if ev.seed is not None and ev.kind == "run":
                row.seeds.append(ev.seed)
        for m in ev.metrics:
            key = (ev.evaluation, m["task"], m["metric"])
            metrics = order.setdefault(key[:2], [])
            if key[2] not in metrics:
                metrics.append(key[2])
            values.setdefault((g, key), []).append(m["value"])
            if m["higher_is_better"] is not None:
                given_direction.setdefault(key, m["higher_is_better"])
    keys = [(e, t, m) for (e, t) in sorted(order) for m in order[(e, t)]]
    tasks_in = {}
    for e, t, _ in keys:
        tasks_in.setdefault(t, set()).add(e)
    labels = {k: (f"{k[1]}/{k[2]}" if len(tasks_in[k[1]]) == 1 else f"{k[0]}:{k[1]}/{k[2]}") for k in keys}
    direction = {k: given_direction.get(k, infer_higher_is_better(k[2])) for k in keys}
    ordered = sorted(rows.values(), key=_row_order)
    for r in ordered:
        r.models.sort()
        r.seeds.sort()
    cells: dict[tuple[str, Key], Cell] = {}
    not_applicable = []
    for (g, key), vals in values.items():
        present = [v for v in vals if v is not None]
        m, se = mean_stderr(present)
        cells[(g, key)] = Cell(n=len(present), mean=m, stderr=se, na=not present)
        if not present:
            not_applicable.append((g, key))
    teachers = [r.name for r in ordered if r.kind == "teacher"]
    if len(teachers) > 1:
        log.warning("several teachers %s; deltas are against %s", teachers, teachers[0])
    teacher = teachers[0] if teachers else None
    ce_group = {}
    for r in ordered:
        if r.kind == "run" and r.mode != NO_KD_MODE:
            ce = group_of("", "run", r.student, NO_KD_MODE, r.tag)
            if ce in rows:
                ce_group[r.name] = ce
    for key in keys:
        hib = direction[key]
        candidates = [(r.name, cells[(r.name, key)].mean) for r in ordered if r.kind != "teacher"
                      and (r.name, key) in cells and cells[(r.name, key)].mean is not None]
        if hib is not None and candidates:
            top = (max if hib else min)(v for _, v in candidates)
            for name, v in candidates:  # ties (up to float rounding of the means) are all best
                cells[(name, key)].best = math.isclose(v, top, rel_tol=1e-12, abs_tol=1e-15)
        t_cell = cells.get((teacher, key)) if teacher else None
        for r in ordered:
            cell = cells.get((r.name, key))
            if cell is None or cell.mean is None:
                continue
            if r.name in ce_group:
                base = cells.get((ce_group[r.name], key))
                if base is not None and base.mean is not None:
                    cell.delta_ce = cell.mean - base.mean
                    if cell.stderr is not None and base.stderr is not None:
                        cell.delta_ce_stderr = math.hypot(cell.stderr, base.stderr)
            if r.kind != "teacher" and t_cell is not None and t_cell.mean is not None:
                cell.delta_teacher = cell.mean - t_cell.mean
                cell.delta_teacher_stderr = cell.stderr
    not_applicable.sort(key=lambda x: (keys.index(x[1]), x[0]))
    return Summary(ordered, keys, labels, direction, cells, ce_group, teacher, not_applicable)


# --------------------------------------------------------------------------- the database

def _runs_rows(c: Collected) -> list[dict]:
    train = {r.name: r for r in c.train}
    out: dict[str, dict] = {}
    for ev in c.evals:
        if ev.model in out:
            continue
        out[ev.model] = {"model": ev.model, "kind": ev.kind, "student": ev.student,
                         "mode": ev.mode if ev.kind == "run" else None,
                         "seed": ev.seed if ev.kind == "run" else None,
                         "tag": ev.tag if ev.kind == "run" else None,
                         "run_group": group_of(ev.model, ev.kind, ev.student, ev.mode, ev.tag), "evaluated": True}
    for run in c.train:
        if run.name not in out:
            s = run.spec
            out[run.name] = {"model": run.name, "kind": "run", "student": s.get("student"), "mode": s.get("mode"),
                             "seed": s.get("seed"), "tag": s.get("tag"),
                             "run_group": group_of(run.name, "run", s.get("student"), s.get("mode"), s.get("tag")),
                             "evaluated": False}
    for name, row in out.items():
        run = train.get(name)
        row.update(terms=None, steps=None, tokens=None, train_seconds=None, final_loss=None, train_dir=None)
        if run is None:
            continue
        s, steps = run.summary, run.steps
        terms = run.spec.get("terms") or s.get("terms")
        last = steps[-5:]
        final = (s.get("final") or {}).get("loss")
        if final is None and last and all(x["loss"] is not None for x in last):
            final = statistics.fmean(x["loss"] for x in last)
        row.update(terms=json.dumps(terms, sort_keys=True) if terms is not None else None,
                   steps=s.get("steps", steps[-1]["step"] if steps else None),
                   tokens=s.get("tokens", sum(x["tokens"] or 0 for x in steps) if steps else None),
                   train_seconds=s.get("train_seconds", steps[-1]["elapsed_s"] if steps else None),
                   final_loss=final, train_dir=run.path)
    return sorted(out.values(), key=lambda r: r["model"])


def _summary_rows(s: Summary) -> list[dict]:
    out = []
    for r in s.rows:
        for key in s.keys:
            cell = s.cell(r.name, key)
            if cell is None:
                continue
            out.append({"run_group": r.name, "kind": r.kind, "student": r.student, "mode": r.mode, "tag": r.tag,
                        "evaluation": key[0], "task": key[1], "metric": key[2], "higher_is_better": s.direction[key],
                        "n": cell.n, "mean": cell.mean, "stderr": cell.stderr, "best": cell.best,
                        "ce_group": s.ce_group.get(r.name), "delta_ce": cell.delta_ce,
                        "delta_ce_stderr": cell.delta_ce_stderr,
                        "teacher": s.teacher if r.kind != "teacher" else None, "delta_teacher": cell.delta_teacher,
                        "delta_teacher_stderr": cell.delta_teacher_stderr})
    return out


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _create(con, name: str, comment: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    import pyarrow as pa

    con.execute(f"CREATE TABLE {name} (" + ", ".join(f'"{c}" {t}' for c, t, _ in columns) + ")")
    con.execute(f"COMMENT ON TABLE {name} IS {_sql_str(comment)}")
    for col, _, text in columns:
        con.execute(f'COMMENT ON COLUMN {name}."{col}" IS {_sql_str(text)}')
    if not rows:
        return
    types = {"VARCHAR": pa.string(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
             "BOOLEAN": pa.bool_()}
    table = pa.table({c: pa.array([r.get(c) for r in rows], types[t]) for c, t, _ in columns})
    con.register("_kdflow_rows", table)
    try:
        con.execute(f"INSERT INTO {name} SELECT * FROM _kdflow_rows")
    finally:
        con.unregister("_kdflow_rows")


def write_database(c: Collected, s: Summary, db_path: str | Path) -> Path:
    """Every table into a new DuckDB file, renamed onto ``db_path`` once complete."""
    import duckdb

    db_path = Path(db_path)
    metric_rows = [{"model": ev.model, "evaluation": ev.evaluation, **m, "source": ev.path}
                   for ev in c.evals for m in ev.metrics]
    data = {"runs": _runs_rows(c), "metrics": metric_rows,
            "train_steps": sorted((x for r in c.train for x in r.steps), key=lambda x: (x["model"], x["step"])),
            "jobs": c.jobs, "telemetry": c.telemetry, "energy": c.energy, "summary": _summary_rows(s)}
    with atomic_path(db_path) as tmp:
        wal = tmp.with_name(tmp.name + ".wal")
        con = duckdb.connect(str(tmp))
        try:
            for name, (comment, columns) in TABLES.items():
                _create(con, name, comment, columns, data[name])
            con.execute("CHECKPOINT")
        finally:
            con.close()
            wal.unlink(missing_ok=True)  # empty after the checkpoint; a failed write leaves nothing behind
    return db_path


# --------------------------------------------------------------------------- summary files

def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:+.3e}" if signed else f"{x:.3e}"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _csv_value(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, bool):
        return int(x)
    return x


def write_summary_csv(s: Summary, path: str | Path, c: Collected | None = None) -> Path:
    """One row per summary row; per metric label L the columns L, L.stderr, L.n, L.best, L.delta_ce, L.delta_teacher."""
    terms = {}
    if c is not None:
        for row in _runs_rows(c):
            if row["terms"] is not None:
                terms.setdefault(row["run_group"], row["terms"])
    header = ["run_group", "kind", "student", "mode", "tag", "terms", "n_seeds", "seeds"]
    suffixes = ("", ".stderr", ".n", ".best", ".delta_ce", ".delta_teacher")
    for key in s.keys:
        header += [s.labels[key] + suf for suf in suffixes]
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            for r in s.rows:
                line = [r.name, r.kind, r.student, r.mode, r.tag, terms.get(r.name), len(r.models),
                        ";".join(map(str, r.seeds))]
                for key in s.keys:
                    cell = s.cell(r.name, key) or Cell()
                    line += [cell.mean, cell.stderr, cell.n if (r.name, key) in s.cells else None, cell.best,
                             cell.delta_ce, cell.delta_teacher]
                w.writerow([_csv_value(x) for x in line])
    return path


def _md_cell(cell: Cell | None, n_models: int) -> str:
    if cell is None:
        return "–"
    if cell.na:
        return "n/a"
    text = _fmt(cell.mean) + (f" ± {_fmt(cell.stderr)}" if cell.stderr is not None else "")
    if cell.n != n_models:
        text += f" (n={cell.n})"
    return f"**{text}** ★" if cell.best else text


def _md_delta(d: float | None, se: float | None) -> str:
    if d is None:
        return ""
    return _fmt(d, signed=True) + (f" ± {_fmt(se)}" if se is not None else "")


def _arrow(hib: bool | None) -> str:
    return {True: " ↑", False: " ↓", None: ""}[hib]


def _md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + \
           ["| " + " | ".join(x.replace("|", "\\|") for x in r) + " |" for r in rows]


def summary_markdown(s: Summary, c: Collected) -> str:
    """summary.md: runs overview, one values table and one deltas table per evaluation task, n/a list, jobs,
    energy and memory per stage."""
    lines = ["# kdflow results", "",
             f"{len({ev.model for ev in c.evals})} evaluated models ({len(c.evals)} evaluation files), "
             f"{len(c.train)} training runs, {len(c.jobs)} job benchmarks.", "",
             "Values are mean ± standard error over seeds (sample standard deviation / √n; none with one seed). "
             "↑ higher is better, ↓ lower is better; **bold ★** marks the best student row per metric (the teacher "
             "is not ranked). n/a: not applicable to that model; –: not evaluated. Δ ce: difference to the no-KD "
             "(ce) group of the same student and tag; Δ teacher: difference to the teacher "
             f"({s.teacher or 'none'}).", ""]
    runs = _runs_rows(c)
    by_group: dict[str, list[dict]] = {}
    for r in runs:
        by_group.setdefault(r["run_group"], []).append(r)
    table = []
    for r in s.rows:
        members = by_group.get(r.name, [])
        steps = [m["steps"] for m in members if m["steps"] is not None]
        secs = [m["train_seconds"] for m in members if m["train_seconds"] is not None]
        loss = [m["final_loss"] for m in members if m["final_loss"] is not None]
        lm, lse = mean_stderr(loss)
        table.append([r.name, r.kind, next((m["terms"] for m in members if m["terms"]), "") or "",
                      ", ".join(map(str, r.seeds)) or "–", _fmt(statistics.fmean(steps)) if steps else "",
                      _fmt(statistics.fmean(secs)) if secs else "",
                      (_fmt(lm) + (f" ± {_fmt(lse)}" if lse is not None else "")) if lm is not None else ""])
    lines += ["## Runs", ""] + _md_table(["row", "kind", "terms", "seeds", "steps", "train s", "final loss"], table,
                                         ["---", "---", "---", "---", "---:", "---:", "---:"]) + [""]
    unevaluated = [r["model"] for r in runs if not r["evaluated"]]
    if unevaluated:
        lines += [f"Trained but not evaluated (in the database only): {', '.join(unevaluated)}.", ""]
    tasks: dict[tuple[str, str], list[Key]] = {}
    for key in s.keys:
        tasks.setdefault(key[:2], []).append(key)
    for (evaluation, task), keys in tasks.items():
        title = task if task == evaluation else f"{task} ({evaluation})"
        lines += [f"## {title}", ""]
        rows = [[r.name + (" (teacher)" if r.kind == "teacher" else ""), str(len(r.models))]
                + [_md_cell(s.cell(r.name, k), len(r.models)) for k in keys]
                for r in s.rows if any((r.name, k) in s.cells for k in keys)]
        lines += _md_table(["row", "n"] + [k[2] + _arrow(s.direction[k]) for k in keys], rows) + [""]
        deltas = []
        for r in s.rows:
            if r.kind == "teacher" or not any((r.name, k) in s.cells for k in keys):
                continue
            line = [r.name]
            for k in keys:
                cell = s.cell(r.name, k) or Cell()
                line += [_md_delta(cell.delta_ce, cell.delta_ce_stderr),
                         _md_delta(cell.delta_teacher, cell.delta_teacher_stderr)]
            deltas.append(line)
        if deltas:
            lines += [f"Δ for {title}:", ""]
            lines += _md_table(["row"] + [f"{k[2]} Δ {h}" for k in keys for h in ("ce", "teacher")], deltas) + [""]
    if s.not_applicable:
        lines += ["## Not applicable", ""]
        lines += [f"- {g}: {k[1]}/{k[2]} ({k[0]})" for g, k in s.not_applicable] + [""]
    if c.jobs:
        per_rule: dict[str, list[dict]] = {}
        for j in c.jobs:
            per_rule.setdefault(j["rule"], []).append(j)
        table = []
        for rule in sorted(per_rule):
            js = per_rule[rule]
            secs = [j["seconds"] for j in js if j["seconds"] is not None]
            rss = [j["max_rss_mb"] for j in js if j["max_rss_mb"] is not None]
            table.append([rule, str(len(js)), _fmt(sum(secs)) if secs else "", _fmt(max(secs)) if secs else "",
                          _fmt(max(rss)) if rss else ""])
        lines += ["## Jobs", ""] + _md_table(["rule", "jobs", "total s", "longest s", "peak RSS MB"], table) + [""]
    if c.energy:
        lines += _energy_markdown(c.energy)
    return "\n".join(lines)


def _fmt_amount(x: float | None) -> str:
    """Tokens, joules, MB: whole numbers with thousands separators from 1,000 on (not 6e+04 MB)."""
    return f"{x:,.0f}" if x is not None and abs(x) >= 1000 else _fmt(x)


def _energy_markdown(energy: list[dict]) -> list[str]:
    """The "Energy and memory per stage" section: the energy table aggregated per rule."""
    per_rule: dict[str, list[dict]] = {}
    for j in energy:
        per_rule.setdefault(j["rule"], []).append(j)
    table = []
    for rule in sorted(per_rule):
        js = per_rule[rule]
        tokens = [j["tokens"] for j in js if j["tokens"] is not None]
        joules = [j["energy_j"] for j in js if j["energy_j"] is not None]
        both = [j for j in js if j["energy_j"] is not None and j["tokens"]]
        per_token = sum(j["energy_j"] for j in both) / sum(j["tokens"] for j in both) if both else None
        table.append([rule, str(len(js)), f"{sum(j['nvml'] for j in js)}/{len(js)}",
                      _fmt_amount(sum(tokens) if tokens else None), _fmt_amount(sum(joules) if joules else None),
                      _fmt(per_token), _fmt_amount(_max(*(j["peak_gpu_mem_mb"] for j in js))),
                      _fmt_amount(_max(*(j["peak_rss_mb"] for j in js)))])
    lines = ["## Energy and memory per stage", "",
             "From the GPU rules' telemetry (results/telemetry): tokens and GPU energy summed over a rule's jobs, "
             "J/token over the jobs that have both, peaks over its jobs (GPU memory: the fullest single GPU).", ""]
    lines += _md_table(["rule", "jobs", "NVML", "tokens", "energy J", "J/token", "peak GPU MB", "peak RSS MB"],
                       table) + [""]
    reasons = sorted({j["nvml_error"] or "unknown" for j in energy if not j["nvml"]})
    if reasons:
        n = sum(not j["nvml"] for j in energy)
        lines += [f"NVML unavailable in {n} of {len(energy)} jobs ({'; '.join(reasons)}): no energy or GPU memory "
                  f"for those, CPU and RSS only.", ""]
    incomplete = [f"{j['rule']}/{j['job']}" for j in energy if not j["complete"]]
    if incomplete:
        lines += [f"Incomplete telemetry (killed or failed jobs): {', '.join(incomplete)}.", ""]
    return lines


def write_summary_md(s: Summary, c: Collected, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(summary_markdown(s, c), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- plots

def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def make_plots(c: Collected, s: Summary, plots_dir: str | Path) -> list[Path]:
    """PNG files into ``plots_dir`` (replaced as a whole, atomically); returns their final paths, sorted.

    * ``train_<term>.png``: loss and each term vs step, one line per run, a group's seeds in one colour;
    * ``metric_<evaluation>_<task>_<metric>.png``: mean ± stderr per row (bars), the teacher as a dashed line;
    * ``delta_ce_<evaluation>_<task>_<metric>.png``: KD group minus its no-KD group (± stderr).
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    plots_dir = Path(plots_dir)
    groups = [r.name for r in s.rows]
    runs = _runs_rows(c)
    for r in runs:
        if r["run_group"] not in groups:
            groups.append(r["run_group"])
    colour = _colours(groups)
    group_of_run = {r["model"]: r["run_group"] for r in runs}
    styles = ["-", "--", ":", "-."]
    written: list[str] = []
    with atomic_path(plots_dir) as tmp:
        tmp.mkdir(parents=True)
        # training curves
        for term in TRAIN_TERMS:
            series = [(run.name, [(x["step"], x[term]) for x in run.steps if x[term] is not None]) for run in c.train]
            series = [(n, pts) for n, pts in series if pts]
            if not series:
                continue
            fig = Figure(figsize=(8, 4.5))
            ax = fig.subplots()
            seen: dict[str, int] = {}
            for name, pts in sorted(series, key=lambda x: (group_of_run[x[0]], x[0])):
                g = group_of_run[name]
                k = seen.get(g, 0)
                seen[g] = k + 1
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour[g], linestyle=styles[k % len(styles)],
                        linewidth=1.2)
            ax.legend([Line2D([], [], color=colour[g]) for g in seen], list(seen), fontsize=7, loc="best")
            ax.set_xlabel("step")
            ax.set_ylabel(term)
            ax.set_title(f"training {term} (one line per run; a group's seeds share a colour)")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            name = f"train_{_safe(term)}.png"
            fig.savefig(tmp / name, dpi=100)
            written.append(name)
        # metric bars and deltas
        for key in s.keys:
            label = f"{key[1]}/{key[2]} ({key[0]})"
            hib = s.direction[key]
            bars = [(r.name, s.cells[(r.name, key)]) for r in s.rows if r.kind != "teacher"
                    and (r.name, key) in s.cells and s.cells[(r.name, key)].mean is not None]
            if bars:
                fig = Figure(figsize=(8, 1.5 + 0.35 * len(bars)))
                ax = fig.subplots()
                ys = list(range(len(bars)))[::-1]
                ax.barh(ys, [b.mean for _, b in bars], xerr=[b.stderr or 0.0 for _, b in bars], capsize=3,
                        color=[colour[n] for n, _ in bars],
                        edgecolor=["black" if b.best else "none" for _, b in bars],
                        linewidth=[2.0 if b.best else 0.0 for _, b in bars])
                ax.set_yticks(ys, [n + (" ★" if b.best else "") for n, b in bars], fontsize=8)
                t = s.cells.get((s.teacher, key)) if s.teacher else None
                if t is not None and t.mean is not None:
                    ax.axvline(t.mean, color="black", linestyle="--", linewidth=1, label=f"teacher {s.teacher}")
                    ax.legend(fontsize=7, loc="best")
                ax.set_xlabel(key[2] + {True: " (higher is better)", False: " (lower is better)", None: ""}[hib])
                ax.set_title(f"{label}: mean ± stderr over seeds")
                ax.grid(axis="x", alpha=0.3)
                fig.tight_layout()
                name = f"metric_{_safe(key[0])}_{_safe(key[1])}_{_safe(key[2])}.png"
                fig.savefig(tmp / name, dpi=100)
                written.append(name)
            deltas = [(r.name, s.cells[(r.name, key)]) for r in s.rows
                      if (r.name, key) in s.cells and s.cells[(r.name, key)].delta_ce is not None]
            if deltas:
                fig = Figure(figsize=(8, 1.5 + 0.35 * len(deltas)))
                ax = fig.subplots()
                ys = list(range(len(deltas)))[::-1]
                good = [(d.delta_ce > 0) == hib if hib is not None else None for _, d in deltas]
                ax.barh(ys, [d.delta_ce for _, d in deltas], xerr=[d.delta_ce_stderr or 0.0 for _, d in deltas],
                        capsize=3, color=["tab:green" if g else "tab:red" if g is False else "tab:gray" for g in good])
                ax.set_yticks(ys, [f"{n} − {s.ce_group[n]}" for n, _ in deltas], fontsize=8)
                ax.axvline(0.0, color="black", linewidth=1)
                ax.set_xlabel(f"Δ {key[2]} vs no-KD (ce)" + {True: ", > 0 is better", False: ", < 0 is better",
                                                              None: ""}[hib])
                ax.set_title(f"{label}: KD minus no-KD (green: KD better)")
                ax.grid(axis="x", alpha=0.3)
                fig.tight_layout()
                name = f"delta_ce_{_safe(key[0])}_{_safe(key[1])}_{_safe(key[2])}.png"
                fig.savefig(tmp / name, dpi=100)
                written.append(name)
    return sorted(plots_dir / n for n in written)


# --------------------------------------------------------------------------- all of it

def build_results(eval_files: Iterable[str | Path], train_dirs: Iterable[str | Path] = (),
                  benchmark_files: Iterable[str | Path] = (), expected: dict | None = None,
                  db_path: str | Path | None = None, csv_path: str | Path | None = None,
                  md_path: str | Path | None = None, plots_dir: str | Path | None = None,
                  telemetry_files: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Read, check (:class:`ResultsError` before anything is written), then write every output given.

    ``expected``: ``{"models": [ids], "evaluations": {evaluation: [tasks]}}``, or None to skip the coverage
    check. An output given as None is not written. Returns ``{"database", "csv", "markdown", "plots" (PNG
    paths), "summary" (:class:`Summary`)}``.
    """
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
    log.info("results: %d models, %d metrics, %d training runs, %d jobs, %d telemetry files -> %s, %s, %s, %d plots",
             len({ev.model for ev in c.evals}), sum(len(ev.metrics) for ev in c.evals), len(c.train), len(c.jobs),
             len(c.energy), db_path, csv_path, md_path, len(out["plots"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdflow.results", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", nargs="*", default=[], help="evaluation JSON files")
    ap.add_argument("--train", nargs="*", default=[], help="training run directories")
    ap.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark TSV files")
    ap.add_argument("--telemetry", nargs="*", default=[], help="telemetry JSON-lines files")
    ap.add_argument("--expected", help="JSON file {\"models\": [...], \"evaluations\": {...}} for the coverage check")
    ap.add_argument("--db", default="results/kdflow.duckdb")
    ap.add_argument("--csv", default="results/summary.csv")
    ap.add_argument("--md", default="results/summary.md")
    ap.add_argument("--plots", default="results/plots")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    expected = json.loads(Path(args.expected).read_text(encoding="utf-8")) if args.expected else None
    try:
        build_results(args.eval, args.train, args.benchmarks, expected, args.db, args.csv, args.md, args.plots,
                      args.telemetry)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

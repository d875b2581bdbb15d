"""The checks: every problem of the collected inputs (reading, consistency, ranges, coverage) in one
:class:`ResultsError`, raised before anything is written."""

from __future__ import annotations

import math
from pathlib import Path

from kdflow.errors import KdflowError
from kdflow.eval_record import Metric
from kdflow.results.metric_kinds import metric_class
from kdflow.results.readers import Collected, EvalFile, rerun_hint

KL_TOLERANCE = 1e-3  # KL against a float16 teacher cache may be a hair below 0 (the teacher against its own cache)
MAX_PROBLEMS = 40  # problems listed in one ResultsError message


class ResultsError(KdflowError, ValueError):
    """Evaluation results that are missing, malformed or out of range; the message names file, model, metric."""


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
            problems.append(
                f"{ev.path}: model {ev.model}: a second {ev.evaluation} file (the first is {seen[key]}); "
                f"pass one file per model and evaluation"
            )
        seen.setdefault(key, ev.path)
        ident = (ev.kind, ev.student, ev.mode, ev.seed, ev.tag)
        if ev.model in identity and identity[ev.model][1] != ident:
            other = identity[ev.model][0]
            problems.append(
                f"{ev.path}: model {ev.model}: kind/student/mode/seed/tag {ident} differ from {other.path} "
                f"{identity[ev.model][1]}; {rerun_hint(ev.path)}"
            )
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
                ours = (kind, student, mode, seed, tag)
                problems.append(
                    f"{ev.path}: model {ev.model}: (kind, student, mode, seed, tag) = {ours}"
                    f" but its training run {run.path} has {('run', *theirs)}; {rerun_hint(ev.path)}"
                )
    if expected:
        problems += _check_coverage(c, expected)
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"\n… and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise ResultsError(f"{len(problems)} problem(s) in the results inputs:\n- " + "\n- ".join(shown) + more)


def _check_value(ev: EvalFile, m: Metric) -> list[str]:
    where = f"{ev.path}: model {ev.model}, task {m.task}, metric {m.metric}"
    fix = f"the evaluation wrote a wrong value: check its log and {rerun_hint(ev.path)}"
    out = []
    value, stderr = m.value, m.stderr
    if stderr is not None and (not math.isfinite(stderr) or stderr < 0):
        out.append(f"{where}: stderr = {stderr} is not a finite number >= 0; {fix}")
    if value is None:
        return out  # not applicable to this model
    if not math.isfinite(value):
        return out + [f"{where}: value = {value} is not finite (NaN or inf); {fix}"]
    kind = metric_class(m.metric)
    if kind == "accuracy" and not 0.0 <= value <= 1.0:
        out.append(f"{where}: value = {value} is outside [0, 1] (an accuracy or agreement); {fix}")
    elif kind == "perplexity" and value < 1.0:
        out.append(f"{where}: value = {value} is below 1 (a perplexity); {fix}")
    elif kind == "nonnegative" and value < 0.0:
        out.append(f"{where}: value = {value} is negative (bits per byte / NLL are >= 0); {fix}")
    elif kind == "kl" and value < -KL_TOLERANCE:
        out.append(
            f"{where}: value = {value} is below -{KL_TOLERANCE} (a KL divergence; float16 caches allow only "
            f"tiny negative values); {fix}"
        )
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
                out.append(
                    f"model {model}: no {evaluation} results ({target} is not among the inputs); run "
                    f"`snakemake {target}`"
                )
                continue
            have = {m.task for m in ev.metrics}
            for task in tasks:
                if task not in have:
                    out.append(
                        f"{ev.path}: model {model}, evaluation {evaluation}: no metric for task {task} "
                        f"(tasks present: {sorted(have)}); the config expects it: {rerun_hint(ev.path)}"
                    )
    return out

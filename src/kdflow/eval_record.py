"""The eval record: what the eval rule writes (``results/eval/<model>/heldout.json`` and ``lm_eval.json``, by
kdflow.evaluate) and what kdflow.results reads back, as one typed contract.

:class:`EvalRecord` (one file) holds the evaluated model's identity (the eval target's ``model``, ``kind``,
``student``, ``mode``, ``seed``, ``tag``), the ``evaluation`` (``heldout`` or ``lm_eval``), its :class:`Metric`
entries, and the free-form ``details`` and ``provenance`` objects. Both types check themselves when made
(:class:`EvalRecordError` lists every fault); ``to_json`` gives the file's object (written with
:func:`kdflow.atomic.write_json`), ``from_json`` reads one back. What a record guarantees is its *shape*: names,
types, a run's id matching its fields. Whether a value is plausible (finite, an accuracy in [0, 1] …) is the
results checks' business (kdflow.results.checks), not the record's: a diverged model's NaN is still written.

No torch here: kdflow.results imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kdflow.errors import KdflowError
from kdflow.plan import KINDS
from kdflow.runs import run_name

# Keys a record file must have; the identity keys student/mode/seed/tag default to null, details/provenance to {}.
REQUIRED_KEYS = ("model", "kind", "evaluation", "metrics")
# lm-eval's marks for a standard error it did not compute, read as null (kdflow itself writes null).
STDERR_NOT_COMPUTED = {"", "NA", "-", "N/A"}


class EvalRecordError(KdflowError, ValueError):
    """A record that breaks the contract; ``problems`` lists every fault (without the file's path). From
    :meth:`EvalRecord.from_json`, ``partial`` is the record without its faulty metric entries when only those were
    at fault (so that a reader can still check the rest), else None."""

    def __init__(self, problems: list[str], partial: EvalRecord | None = None):
        super().__init__("; ".join(problems))
        self.problems = list(problems)
        self.partial = partial


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_name(x: Any) -> bool:
    return isinstance(x, str) and bool(x)


@dataclass(frozen=True)
class Metric:
    """One metric of an evaluation: ``value`` null where it does not apply to the model (top-1 agreement of a
    student with its own tokenizer); ``stderr`` the evaluation's own standard error (lm-eval's), null where none
    was computed; ``higher_is_better`` null where the evaluation does not say. Numbers are stored as floats."""

    task: str
    metric: str
    value: float | None
    stderr: float | None = None
    higher_is_better: bool | None = None

    def __post_init__(self) -> None:
        if not _is_name(self.task) or not _is_name(self.metric):
            raise EvalRecordError([f"{self!r} lacks a task or metric name"])
        where = f"task {self.task}, metric {self.metric}"
        problems = []
        if self.value is not None and not _is_number(self.value):
            problems.append(f"{where}: value {self.value!r} is not a number")
        if self.stderr is not None and not _is_number(self.stderr):
            problems.append(f"{where}: stderr {self.stderr!r} is not a number")
        if self.higher_is_better is not None and not isinstance(self.higher_is_better, bool):
            problems.append(f"{where}: higher_is_better {self.higher_is_better!r} is not true/false/null")
        if problems:
            raise EvalRecordError(problems)
        for name in ("value", "stderr"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "value": self.value,
            "stderr": self.stderr,
            "higher_is_better": self.higher_is_better,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Metric:
        """One ``metrics`` entry; a stderr of lm-eval's ``"N/A"`` (or ``NA``, ``-``, empty) is read as null."""
        stderr = obj.get("stderr")
        if isinstance(stderr, str) and stderr.strip().upper() in STDERR_NOT_COMPUTED:
            stderr = None
        return cls(obj.get("task"), obj.get("metric"), obj.get("value"), stderr, obj.get("higher_is_better"))


@dataclass(frozen=True, kw_only=True)
class EvalRecord:
    """One evaluation of one model: the contents of ``results/eval/<model>/<evaluation>.json``."""

    model: str  # the eval target's id: the run name, the teacher's name or <student>.init
    kind: str  # one of KINDS
    student: str | None = None
    mode: str | None = None
    seed: int | None = None
    tag: str | None = None
    evaluation: str  # heldout | lm_eval
    metrics: tuple[Metric, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)  # how it was measured (documents, tokens, settings, time)
    provenance: dict[str, Any] = field(default_factory=dict)  # git commit, package versions, the weights' identity

    def __post_init__(self) -> None:
        if not _is_name(self.model):
            raise EvalRecordError([f'"model" is {self.model!r}, expected the model id'])
        object.__setattr__(self, "metrics", tuple(self.metrics))
        problems = self._identity_problems()
        if not _is_name(self.evaluation):
            problems.append(f'model {self.model}: "evaluation" is {self.evaluation!r}, expected its name')
        for i, m in enumerate(self.metrics):
            if not isinstance(m, Metric):
                problems.append(f"model {self.model}: metrics[{i}] = {m!r} is not a Metric")
        for name in ("details", "provenance"):
            if not isinstance(getattr(self, name), dict):
                problems.append(f"model {self.model}: {name!r} is {getattr(self, name)!r}, expected an object")
        if problems:
            raise EvalRecordError(problems)

    def _identity_problems(self) -> list[str]:
        model = self.model
        if self.kind not in KINDS:
            return [f"model {model}: kind {self.kind!r} is none of {list(KINDS)}"]
        bad = [k for k in ("student", "mode", "tag") if not isinstance(getattr(self, k), (str, type(None)))]
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad.append("seed")
        if self.kind == "run" and (not self.student or not self.mode or "seed" in bad or self.seed is None):
            return [
                f"model {model}: a run needs student, mode and an integer seed, found student={self.student!r} "
                f"mode={self.mode!r} seed={self.seed!r}"
            ]
        if bad:
            found = " ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            return [f"model {model}: student, mode and tag are text or null and seed an integer or null, found {found}"]
        if self.kind == "run":
            expected = run_name(self.student, self.mode, self.seed, self.tag)
            if expected != model:
                return [f"model {model}: student/mode/seed/tag say the run is {expected!r}"]
        return []

    def to_json(self) -> dict[str, Any]:
        """The file's object, keys in this order (:func:`kdflow.atomic.write_json` sorts them)."""
        return {
            "model": self.model,
            "kind": self.kind,
            "student": self.student,
            "mode": self.mode,
            "seed": self.seed,
            "tag": self.tag,
            "evaluation": self.evaluation,
            "metrics": [m.to_json() for m in self.metrics],
            "details": self.details,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: Any) -> EvalRecord:
        """A record from a file's parsed JSON; :class:`EvalRecordError` lists every fault found (a bad metric
        entry does not hide the others; its ``partial`` is the record without them when the rest is sound). Keys
        the record does not know are ignored."""
        if not isinstance(data, dict):
            raise EvalRecordError([f"expected a JSON object, found {type(data).__name__}"])
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise EvalRecordError([f"missing key(s) {missing}"])
        model = data["model"]
        if not _is_name(model):
            raise EvalRecordError([f'"model" is {model!r}, expected the model id'])
        problems: list[str] = []  # the metric entries' faults
        metrics: list[Metric] = []
        if not isinstance(data["metrics"], list):
            problems.append(f'model {model}: "metrics" is not a list')
        else:
            for i, m in enumerate(data["metrics"]):
                if not isinstance(m, Mapping) or not _is_name(m.get("task")) or not _is_name(m.get("metric")):
                    problems.append(f"model {model}: metrics[{i}] = {m!r} lacks a task or metric name")
                    continue
                try:
                    metrics.append(Metric.from_json(m))
                except EvalRecordError as e:
                    problems += [f"model {model}, {p}" for p in e.problems]
        try:
            record = cls(
                model=model,
                kind=data["kind"],
                student=data.get("student"),
                mode=data.get("mode"),
                seed=data.get("seed"),
                tag=data.get("tag"),
                evaluation=data["evaluation"],
                metrics=tuple(metrics),
                details=data.get("details", {}),
                provenance=data.get("provenance", {}),
            )
        except EvalRecordError as e:
            raise EvalRecordError(e.problems + problems) from None
        if problems:
            raise EvalRecordError(problems, partial=record)
        return record

"""The summary statistics: evaluation metrics aggregated over seeds per run group (mean, standard error), the
best student row per metric, deltas against the no-KD group and the teacher."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kdflow.results.metric_kinds import infer_higher_is_better
from kdflow.results.readers import Collected, group_of

log = logging.getLogger("kdflow.results")

NO_KD_MODE = "ce"

Key = tuple[str, str, str]  # (evaluation, task, metric)


@dataclass
class Row:
    """A summary row: a run group (its seeds aggregated) or a baseline model (the teacher, a student's init)."""

    name: str
    kind: str
    student: str | None
    mode: str | None
    tag: str | None
    models: list[str]
    seeds: list[int]


@dataclass
class Cell:
    """One summary row's numbers for one metric."""

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
    """The rows, the metric keys in column order, and a :class:`Cell` per (row, key) with a value."""

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
    # Python rather than DuckDB's avg/stddev_samp: statistics.stdev is exact (rational arithmetic, one rounding);
    # stddev_samp differs in the last bits for about half of all 2-5 seed groups, which would change summary.csv.
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

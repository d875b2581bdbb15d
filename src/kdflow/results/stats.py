"""The summary statistics: evaluation metrics aggregated over seeds per run group (n, mean, standard error) and
the best student row per metric, in one DuckDB query (:data:`CELL_STATS`); deltas against the no-KD group and the
teacher from those cells."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kdflow.results.metric_kinds import infer_higher_is_better
from kdflow.results.tables import LOAD_SHARE_WARNING
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
    na: bool = False  # entries exist but every value is null (not applicable)
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
    ce_group: dict[str, str]  # run group -> its no-KD group
    teacher: str | None
    not_applicable: list[tuple[str, Key]]

    def cell(self, row: str, key: Key) -> Cell | None:
        return self.cells.get((row, key))


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)); stderr None with fewer than 2 values. (The
    summary's cells come from :data:`CELL_STATS` in DuckDB; this is for the runs overview's training numbers.)"""
    if not values:
        return None, None
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


# Per (summary row, metric key): n, mean and standard error over the seeds, and whether the row is the best student
# row. The mean is fsum / count (= Python's statistics.fmean, also in the last bit; avg() is not); the spread is
# two-pass (stddev_samp's one-pass update drifts to ~1e-9 relative when the values are close; this stays within
# ~2 ulp of the exact statistics.stdev). Best: within rounding (math.isclose, rel 1e-12, abs 1e-15) of the top mean
# of the non-teacher rows, in the key's direction; NULL for the teacher, for n/a and for an unknown direction.
# Deterministic (one thread).
CELL_STATS = """
with cells as (
    select run_group, kind, evaluation, task, metric, count(value) as n,
           case when count(value) > 0 then fsum(value) / count(value) end as mean
    from entries group by all
), spread as (
    select run_group, evaluation, task, metric, c.kind, c.n, c.mean,
           fsum((e.value - c.mean) * (e.value - c.mean)) as ss
    from entries e join cells c using (run_group, evaluation, task, metric)
    group by all
), ranked as (
    select s.*, d.higher_is_better as hib,
           case when d.higher_is_better then max(s.mean) filter (where s.kind <> 'teacher') over key_rows
                else min(s.mean) filter (where s.kind <> 'teacher') over key_rows end as top
    from spread s left join directions d using (evaluation, task, metric)
    window key_rows as (partition by evaluation, task, metric)
)
select run_group, evaluation, task, metric, n, mean,
       case when n > 1 then sqrt(ss / (n - 1)) / sqrt(n) end as stderr,
       case when hib is null or kind = 'teacher' or mean is null then null
            else abs(mean - top) <= greatest(1e-12 * greatest(abs(mean), abs(top)), 1e-15) end as best
from ranked
"""


def cell_stats(
    entries: list[tuple[str, str, Key, float | None]], direction: dict[Key, bool | None]
) -> dict[tuple[str, Key], tuple[int, float | None, float | None, bool | None]]:
    """``{(row, key): (n, mean, stderr, best)}`` by :data:`CELL_STATS` from ``entries`` ``(row, row kind, key,
    value)``, one per metric entry of each model of the row, and each key's direction."""
    import duckdb
    import pyarrow as pa

    names = ("evaluation", "task", "metric")
    entry_table = pa.table(
        {
            "run_group": pa.array([e[0] for e in entries], pa.string()),
            "kind": pa.array([e[1] for e in entries], pa.string()),
            **{n: pa.array([e[2][i] for e in entries], pa.string()) for i, n in enumerate(names)},
            "value": pa.array([e[3] for e in entries], pa.float64()),
        }
    )
    direction_table = pa.table(
        {
            **{n: pa.array([k[i] for k in direction], pa.string()) for i, n in enumerate(names)},
            "higher_is_better": pa.array(list(direction.values()), pa.bool_()),
        }
    )
    con = duckdb.connect(config={"threads": 1})
    try:
        con.register("entries", entry_table)
        con.register("directions", direction_table)
        rows = con.execute(CELL_STATS).fetchall()
    finally:
        con.close()
    return {(g, (e, t, m)): (n, mean, se, best) for g, e, t, m, n, mean, se, best in rows}


def _row_order(row: Row) -> tuple:
    rank = {"teacher": 0, "student_init": 1, "run": 2}[row.kind]
    return (rank != 0, row.student or "", rank, row.tag or "", row.mode != NO_KD_MODE, row.mode or "", row.name)


def summarize(c: Collected) -> Summary:
    """Aggregate the evaluation metrics over seeds per run group (:func:`cell_stats`: n, mean, stderr, best);
    deltas vs ce and vs the teacher."""
    rows: dict[str, Row] = {}
    entries: list[tuple[str, Key, float | None]] = []
    given_direction: dict[Key, bool] = {}
    order: dict[tuple[str, str], list[str]] = {}
    for ev in c.evals:
        g = group_of(ev.model, ev.kind, ev.student, ev.mode, ev.tag)
        run = ev.kind == "run"
        row = rows.setdefault(g, Row(g, ev.kind, ev.student, ev.mode if run else None, ev.tag if run else None, [], []))
        if ev.model not in row.models:
            row.models.append(ev.model)
            if ev.seed is not None and run:
                row.seeds.append(ev.seed)
        for m in ev.metrics:
            key = (ev.evaluation, m.task, m.metric)
            metrics = order.setdefault(key[:2], [])
            if key[2] not in metrics:
                metrics.append(key[2])
            entries.append((g, key, m.value))
            if m.higher_is_better is not None:
                given_direction.setdefault(key, m.higher_is_better)
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
    stats = cell_stats([(g, rows[g].kind, key, v) for g, key, v in entries], direction)
    cells: dict[tuple[str, Key], Cell] = {}
    not_applicable = []
    for g, key, _ in entries:
        if (g, key) in cells:
            continue
        n, mean, stderr, best = stats[(g, key)]
        cells[(g, key)] = Cell(n=n, mean=mean, stderr=stderr, na=n == 0, best=best)
        if n == 0:
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


def load_shares(energy: list[dict]) -> list[dict]:
    """The ``load_share`` table: per rule, over its jobs that report ``load_s``, the seconds spent loading models
    against the jobs' whole measured time (one DuckDB query)."""
    import duckdb
    import pyarrow as pa

    timed = [j for j in energy if j.get("load_s") is not None and j.get("elapsed_s")]
    if not timed:
        return []
    rows = pa.table({k: [j[k] for j in timed] for k in ("rule", "load_s", "compute_s", "elapsed_s")})
    con = duckdb.connect()
    try:
        con.register("timed", rows)
        result = con.execute(
            """
            SELECT rule, count(*) AS jobs, sum(load_s) AS load_s, sum(compute_s) AS compute_s,
                   sum(elapsed_s) AS elapsed_s, sum(load_s) / sum(elapsed_s) AS load_share
            FROM timed GROUP BY rule ORDER BY rule
            """
        )
        names = [d[0] for d in result.description]
        out = [dict(zip(names, row, strict=True)) for row in result.fetchall()]
    finally:
        con.close()
    for row in out:
        row["too_high"] = row["load_share"] > LOAD_SHARE_WARNING
    return out

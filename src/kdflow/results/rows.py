"""The rows of every database table, from the collected inputs and the summary (also what the summary files and
the plots read about runs)."""

from __future__ import annotations

import json
import statistics

from kdflow.results.readers import Collected, group_of
from kdflow.results.stats import Summary, load_shares


def runs_rows(c: Collected) -> list[dict]:
    """The ``runs`` table: one row per evaluated model and per training run directory, sorted by model."""
    train = {r.name: r for r in c.train}
    out: dict[str, dict] = {}
    for ev in c.evals:
        if ev.model in out:
            continue
        out[ev.model] = {
            "model": ev.model,
            "kind": ev.kind,
            "student": ev.student,
            "mode": ev.mode if ev.kind == "run" else None,
            "seed": ev.seed if ev.kind == "run" else None,
            "tag": ev.tag if ev.kind == "run" else None,
            "run_group": group_of(ev.model, ev.kind, ev.student, ev.mode, ev.tag),
            "evaluated": True,
        }
    for run in c.train:
        if run.name not in out:
            s = run.spec
            out[run.name] = {
                "model": run.name,
                "kind": "run",
                "student": s.get("student"),
                "mode": s.get("mode"),
                "seed": s.get("seed"),
                "tag": s.get("tag"),
                "run_group": group_of(run.name, "run", s.get("student"), s.get("mode"), s.get("tag")),
                "evaluated": False,
            }
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
        row.update(
            terms=json.dumps(terms, sort_keys=True) if terms is not None else None,
            steps=s.get("steps", steps[-1]["step"] if steps else None),
            tokens=s.get("tokens", sum(x["tokens"] or 0 for x in steps) if steps else None),
            train_seconds=s.get("train_seconds", steps[-1]["elapsed_s"] if steps else None),
            final_loss=final,
            train_dir=run.path,
        )
    return sorted(out.values(), key=lambda r: r["model"])


def summary_rows(s: Summary) -> list[dict]:
    """The ``summary`` table: one row per (summary row, evaluation, task, metric) with a cell."""
    out = []
    for r in s.rows:
        for key in s.keys:
            cell = s.cell(r.name, key)
            if cell is None:
                continue
            out.append(
                {
                    "run_group": r.name,
                    "kind": r.kind,
                    "student": r.student,
                    "mode": r.mode,
                    "tag": r.tag,
                    "evaluation": key[0],
                    "task": key[1],
                    "metric": key[2],
                    "higher_is_better": s.direction[key],
                    "n": cell.n,
                    "mean": cell.mean,
                    "stderr": cell.stderr,
                    "best": cell.best,
                    "ce_group": s.ce_group.get(r.name),
                    "delta_ce": cell.delta_ce,
                    "delta_ce_stderr": cell.delta_ce_stderr,
                    "teacher": s.teacher if r.kind != "teacher" else None,
                    "delta_teacher": cell.delta_teacher,
                    "delta_teacher_stderr": cell.delta_teacher_stderr,
                }
            )
    return out


def table_rows(c: Collected, s: Summary) -> dict[str, list[dict]]:
    """{table: rows} for every table of :data:`kdflow.results.tables.TABLES`."""
    metric_rows = [
        {"model": ev.model, "evaluation": ev.evaluation, **m.to_json(), "source": ev.path}
        for ev in c.evals
        for m in ev.metrics
    ]
    return {
        "runs": runs_rows(c),
        "metrics": metric_rows,
        "train_steps": sorted((x for r in c.train for x in r.steps), key=lambda x: (x["model"], x["step"])),
        "jobs": c.jobs,
        "telemetry": c.telemetry,
        "energy": c.energy,
        "load_share": load_shares(c.energy),
        "summary": summary_rows(s),
    }

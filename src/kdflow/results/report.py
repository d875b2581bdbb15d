"""The summary files: ``summary.csv`` (one row per summary row, columns per metric) and ``summary.md`` (runs,
one values and one deltas table per evaluation task, n/a list, jobs, energy and memory per stage)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from kdflow.atomic import atomic_path
from kdflow.results.readers import Collected
from kdflow.results.rows import runs_rows
from kdflow.results.stats import Cell, Key, Summary, load_shares, mean_stderr
from kdflow.results.tables import LOAD_SHARE_WARNING


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
        for row in runs_rows(c):
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
                line = [
                    r.name,
                    r.kind,
                    r.student,
                    r.mode,
                    r.tag,
                    terms.get(r.name),
                    len(r.models),
                    ";".join(map(str, r.seeds)),
                ]
                for key in s.keys:
                    cell = s.cell(r.name, key) or Cell()
                    line += [
                        cell.mean,
                        cell.stderr,
                        cell.n if (r.name, key) in s.cells else None,
                        cell.best,
                        cell.delta_ce,
                        cell.delta_teacher,
                    ]
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
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(x.replace("|", "\\|") for x in r) + " |" for r in rows
    ]


def summary_markdown(s: Summary, c: Collected) -> str:
    """summary.md: runs overview, one values table and one deltas table per evaluation task, n/a list, jobs,
    energy and memory per stage."""
    lines = [
        "# kdflow results",
        "",
        f"{len({ev.model for ev in c.evals})} evaluated models ({len(c.evals)} evaluation files), "
        f"{len(c.train)} training runs, {len(c.jobs)} job benchmarks.",
        "",
        "Values are mean ± standard error over seeds (sample standard deviation / √n; none with one seed). "
        "↑ higher is better, ↓ lower is better; **bold ★** marks the best student row per metric (the teacher "
        "is not ranked). n/a: not applicable to that model; –: not evaluated. Δ ce: difference to the no-KD "
        "(ce) group of the same student and tag; Δ teacher: difference to the teacher "
        f"({s.teacher or 'none'}).",
        "",
    ]
    runs = runs_rows(c)
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
        table.append(
            [
                r.name,
                r.kind,
                next((m["terms"] for m in members if m["terms"]), "") or "",
                ", ".join(map(str, r.seeds)) or "–",
                _fmt(statistics.fmean(steps)) if steps else "",
                _fmt(statistics.fmean(secs)) if secs else "",
                (_fmt(lm) + (f" ± {_fmt(lse)}" if lse is not None else "")) if lm is not None else "",
            ]
        )
    lines += (
        ["## Runs", ""]
        + _md_table(
            ["row", "kind", "terms", "seeds", "steps", "train s", "final loss"],
            table,
            ["---", "---", "---", "---", "---:", "---:", "---:"],
        )
        + [""]
    )
    unevaluated = [r["model"] for r in runs if not r["evaluated"]]
    if unevaluated:
        lines += [f"Trained but not evaluated (in the database only): {', '.join(unevaluated)}.", ""]
    tasks: dict[tuple[str, str], list[Key]] = {}
    for key in s.keys:
        tasks.setdefault(key[:2], []).append(key)
    for (evaluation, task), keys in tasks.items():
        title = task if task == evaluation else f"{task} ({evaluation})"
        lines += [f"## {title}", ""]
        rows = [
            [r.name + (" (teacher)" if r.kind == "teacher" else ""), str(len(r.models))]
            + [_md_cell(s.cell(r.name, k), len(r.models)) for k in keys]
            for r in s.rows
            if any((r.name, k) in s.cells for k in keys)
        ]
        lines += _md_table(["row", "n"] + [k[2] + _arrow(s.direction[k]) for k in keys], rows) + [""]
        deltas = []
        for r in s.rows:
            if r.kind == "teacher" or not any((r.name, k) in s.cells for k in keys):
                continue
            line = [r.name]
            for k in keys:
                cell = s.cell(r.name, k) or Cell()
                line += [
                    _md_delta(cell.delta_ce, cell.delta_ce_stderr),
                    _md_delta(cell.delta_teacher, cell.delta_teacher_stderr),
                ]
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
            table.append(
                [
                    rule,
                    str(len(js)),
                    _fmt(sum(secs)) if secs else "",
                    _fmt(max(secs)) if secs else "",
                    _fmt(max(rss)) if rss else "",
                ]
            )
        lines += ["## Jobs", ""] + _md_table(["rule", "jobs", "total s", "longest s", "peak RSS MB"], table) + [""]
    if c.energy:
        lines += _energy_markdown(c.energy)
    return "\n".join(lines)


def _fmt_amount(x: float | None) -> str:
    """Tokens, joules, MB: whole numbers with thousands separators from 1,000 on (not 6e+04 MB)."""
    return f"{x:,.0f}" if x is not None and abs(x) >= 1000 else _fmt(x)


def _peak(jobs: list[dict], column: str) -> float | None:
    return max((j[column] for j in jobs if j[column] is not None), default=None)


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
        table.append(
            [
                rule,
                str(len(js)),
                f"{sum(j['nvml'] for j in js)}/{len(js)}",
                _fmt_amount(sum(tokens) if tokens else None),
                _fmt_amount(sum(joules) if joules else None),
                _fmt(per_token),
                _fmt_amount(_peak(js, "peak_gpu_mem_mb")),
                _fmt_amount(_peak(js, "peak_rss_mb")),
            ]
        )
    lines = [
        "## Energy and memory per stage",
        "",
        "From the GPU rules' telemetry (results/telemetry): tokens and GPU energy summed over a rule's jobs, "
        "J/token over the jobs that have both, peaks over its jobs (GPU memory: the fullest single GPU).",
        "",
    ]
    lines += _md_table(
        ["rule", "jobs", "NVML", "tokens", "energy J", "J/token", "peak GPU MB", "peak RSS MB"], table
    ) + [""]
    reasons = sorted({j["nvml_error"] or "unknown" for j in energy if not j["nvml"]})
    if reasons:
        n = sum(not j["nvml"] for j in energy)
        lines += [
            f"NVML unavailable in {n} of {len(energy)} jobs ({'; '.join(reasons)}): no energy or GPU memory "
            f"for those, CPU and RSS only.",
            "",
        ]
    incomplete = [f"{j['rule']}/{j['job']}" for j in energy if not j["complete"]]
    if incomplete:
        lines += [f"Incomplete telemetry (killed or failed jobs): {', '.join(incomplete)}.", ""]
    return lines + _load_share_markdown(load_shares(energy))


def _load_share_markdown(shares: list[dict]) -> list[str]:
    """The "Model load per stage" section: the load_share table, and a warning line per stage above the limit."""
    if not shares:
        return []
    lines = [
        "## Model load per stage",
        "",
        "Seconds the jobs of each stage spent loading models, against their whole measured time (telemetry end "
        "lines; table load_share).",
        "",
    ]
    table = [
        [r["rule"], str(r["jobs"]), _fmt(r["load_s"]), _fmt(r["compute_s"]), _fmt(r["elapsed_s"]), f"{r['load_share']:.1%}"]
        for r in shares
    ]
    lines += _md_table(["rule", "jobs", "load s", "compute s", "elapsed s", "load share"], table) + [""]
    for r in shares:
        if r["too_high"]:
            lines += [
                f"WARNING: {r['rule']} spends {r['load_share']:.0%} of its job time loading models (more than "
                f"{LOAD_SHARE_WARNING:.0%}): fewer, larger jobs would waste less GPU time (data.n_shards for the "
                "teacher caches: docs/cluster.md, shards sized by cost).",
                "",
            ]
    return lines


def write_summary_md(s: Summary, c: Collected, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(summary_markdown(s, c), encoding="utf-8")
    return path

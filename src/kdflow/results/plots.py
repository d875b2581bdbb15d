"""The plots: training curves, metric bars and KD-vs-no-KD deltas, as PNG files in one folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kdflow.atomic import atomic_path
from kdflow.results.readers import Collected, TrainRun
from kdflow.results.rows import runs_rows
from kdflow.results.stats import Key, Summary

TRAIN_TERMS = ("loss", "ce", "rb", "fb", "relb")  # plotted training curves, in this order
SEED_STYLES = ["-", "--", ":", "-."]  # line styles of a group's runs, in order
DIRECTION = {True: " (higher is better)", False: " (lower is better)", None: ""}
DELTA_DIRECTION = {True: ", > 0 is better", False: ", < 0 is better", None: ""}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _key_name(key: Key) -> str:
    return "_".join(_safe(part) for part in key)


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _axes(height: float) -> Any:
    """The axes of a new 8-inch wide figure."""
    from matplotlib.figure import Figure

    return Figure(figsize=(8, height)).subplots()


def _bar_axes(bars: int) -> tuple[Any, list[int]]:
    """Axes for ``bars`` horizontal bars, and their y positions (the first bar on top)."""
    return _axes(1.5 + 0.35 * bars), list(range(bars))[::-1]


def _save(ax: Any, path: Path, xlabel: str, title: str, ylabel: str | None = None, grid: str = "both") -> None:
    """Label, grid and write the figure of ``ax`` as a PNG."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis=grid, alpha=0.3)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=100)


def _train_plot(
    folder: Path, term: str, train: list[TrainRun], group_of_run: dict[str, str], colour: dict[str, Any]
) -> str | None:
    """``train_<term>.png``: the term vs step, one line per run, a group's seeds in one colour (None: no run
    logs the term)."""
    from matplotlib.lines import Line2D

    series = [(run.name, [(x["step"], x[term]) for x in run.steps if x[term] is not None]) for run in train]
    series = [(n, pts) for n, pts in series if pts]
    if not series:
        return None
    ax = _axes(4.5)
    seen: dict[str, int] = {}
    for name, pts in sorted(series, key=lambda x: (group_of_run[x[0]], x[0])):
        g = group_of_run[name]
        k = seen.get(g, 0)
        seen[g] = k + 1
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color=colour[g],
            linestyle=SEED_STYLES[k % len(SEED_STYLES)],
            linewidth=1.2,
        )
    ax.legend([Line2D([], [], color=colour[g]) for g in seen], list(seen), fontsize=7, loc="best")
    name = f"train_{_safe(term)}.png"
    _save(ax, folder / name, "step", f"training {term} (one line per run; a group's seeds share a colour)", ylabel=term)
    return name


def _metric_plot(folder: Path, key: Key, s: Summary, colour: dict[str, Any]) -> str | None:
    """``metric_<evaluation>_<task>_<metric>.png``: mean ± stderr per student row, the teacher as a dashed line."""
    bars = [
        (r.name, s.cells[(r.name, key)])
        for r in s.rows
        if r.kind != "teacher" and (r.name, key) in s.cells and s.cells[(r.name, key)].mean is not None
    ]
    if not bars:
        return None
    ax, ys = _bar_axes(len(bars))
    ax.barh(
        ys,
        [b.mean for _, b in bars],
        xerr=[b.stderr or 0.0 for _, b in bars],
        capsize=3,
        color=[colour[n] for n, _ in bars],
        edgecolor=["black" if b.best else "none" for _, b in bars],
        linewidth=[2.0 if b.best else 0.0 for _, b in bars],
    )
    ax.set_yticks(ys, [n + (" ★" if b.best else "") for n, b in bars], fontsize=8)
    t = s.cells.get((s.teacher, key)) if s.teacher else None
    if t is not None and t.mean is not None:
        ax.axvline(t.mean, color="black", linestyle="--", linewidth=1, label=f"teacher {s.teacher}")
        ax.legend(fontsize=7, loc="best")
    name = f"metric_{_key_name(key)}.png"
    _save(
        ax,
        folder / name,
        key[2] + DIRECTION[s.direction[key]],
        f"{key[1]}/{key[2]} ({key[0]}): mean ± stderr over seeds",
        grid="x",
    )
    return name


def _delta_plot(folder: Path, key: Key, s: Summary) -> str | None:
    """``delta_ce_<evaluation>_<task>_<metric>.png``: each KD group minus its no-KD group (± stderr)."""
    deltas = [
        (r.name, s.cells[(r.name, key)])
        for r in s.rows
        if (r.name, key) in s.cells and s.cells[(r.name, key)].delta_ce is not None
    ]
    if not deltas:
        return None
    hib = s.direction[key]
    ax, ys = _bar_axes(len(deltas))
    good = [(d.delta_ce > 0) == hib if hib is not None else None for _, d in deltas]
    ax.barh(
        ys,
        [d.delta_ce for _, d in deltas],
        xerr=[d.delta_ce_stderr or 0.0 for _, d in deltas],
        capsize=3,
        color=["tab:green" if g else "tab:red" if g is False else "tab:gray" for g in good],
    )
    ax.set_yticks(ys, [f"{n} − {s.ce_group[n]}" for n, _ in deltas], fontsize=8)
    ax.axvline(0.0, color="black", linewidth=1)
    name = f"delta_ce_{_key_name(key)}.png"
    _save(
        ax,
        folder / name,
        f"Δ {key[2]} vs no-KD (ce)" + DELTA_DIRECTION[hib],
        f"{key[1]}/{key[2]} ({key[0]}): KD minus no-KD (green: KD better)",
        grid="x",
    )
    return name


def make_plots(c: Collected, s: Summary, plots_dir: str | Path) -> list[Path]:
    """PNG files into ``plots_dir`` (replaced as a whole, atomically); returns their final paths, sorted.

    * ``train_<term>.png``: loss and each term vs step, one line per run, a group's seeds in one colour;
    * ``metric_<evaluation>_<task>_<metric>.png``: mean ± stderr per row (bars), the teacher as a dashed line;
    * ``delta_ce_<evaluation>_<task>_<metric>.png``: KD group minus its no-KD group (± stderr).
    """
    import matplotlib

    matplotlib.use("Agg")

    plots_dir = Path(plots_dir)
    groups = [r.name for r in s.rows]
    runs = runs_rows(c)
    for r in runs:
        if r["run_group"] not in groups:
            groups.append(r["run_group"])
    colour = _colours(groups)
    group_of_run = {r["model"]: r["run_group"] for r in runs}
    with atomic_path(plots_dir) as tmp:
        tmp.mkdir(parents=True)
        written = [_train_plot(tmp, term, c.train, group_of_run, colour) for term in TRAIN_TERMS]
        for key in s.keys:
            written += [_metric_plot(tmp, key, s, colour), _delta_plot(tmp, key, s)]
    return sorted(plots_dir / n for n in written if n is not None)

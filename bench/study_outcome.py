"""Does KD beat no-KD? The outcome of a study's training runs, from their summary.json files.

    snakemake --cores all --configfile config/study_cpu.yaml --directory study_cpu
    python bench/study_outcome.py --configfile config/study_cpu.yaml --results study_cpu/results/train

For every mode of the config's runs: the end-of-training held-out perplexity (and its log, the NLL per
token) as mean ± standard error over the seeds, the difference to the ce (no-KD) mode with a paired
comparison over the seeds the two share (mean difference of NLL per token ± its standard error, and how
many seeds KD won), and the training time. Prints a Markdown table to stdout and, as the last line, one
JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdflow.config import load_config  # noqa: E402
from kdflow.runs import expand_runs  # noqa: E402


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None with one value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def fmt(m: float, se: float | None, digits: int = 3) -> str:
    return f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default="config/study_cpu.yaml")
    ap.add_argument("--results", default="results/train", help="where the run directories are")
    ap.add_argument("--baseline", default="ce", help="the no-KD mode")
    args = ap.parse_args()

    runs = expand_runs(load_config(args.configfile))[0]
    rows: dict[str, list[dict]] = {}
    missing = []
    for name, spec in runs.items():
        path = Path(args.results) / name / "summary.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        summary = json.loads(path.read_text())
        if not summary.get("heldout"):
            sys.exit(f"{path}: no held-out perplexity (heldout_docs is 0 for run {name}); nothing to compare")
        rows.setdefault((spec.student, spec.mode), []).append(summary)
    if missing:
        sys.exit(
            f"{len(missing)} runs of {args.configfile} have no summary yet, e.g. {missing[0]}; run "
            f"`snakemake --cores all --configfile {args.configfile}` first"
        )

    out: dict[str, dict] = {}
    lines = [
        "| student | mode | terms | seeds | held-out ppl | NLL/token | Δ NLL vs "
        + args.baseline
        + " (paired) | KD better in | train s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    init_ppl = None
    for (student, mode), summaries in sorted(
        rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != args.baseline, kv[0][1])
    ):
        nll = {s["seed"]: s["heldout"]["nll_per_token"] for s in summaries}
        ppl = [s["heldout"]["ppl"] for s in summaries]
        init_ppl = summaries[0].get("student_heldout_ppl_init")
        base = {s["seed"]: s["heldout"]["nll_per_token"] for s in rows.get((student, args.baseline), [])}
        shared = sorted(set(nll) & set(base))
        entry = {
            "student": student,
            "mode": mode,
            "terms": summaries[0]["terms"],
            "seeds": sorted(nll),
            "ppl_mean": mean_stderr(ppl)[0],
            "ppl_stderr": mean_stderr(ppl)[1],
            "nll_mean": mean_stderr(list(nll.values()))[0],
            "nll_stderr": mean_stderr(list(nll.values()))[1],
            "train_seconds_mean": statistics.fmean(s["train_seconds"] for s in summaries),
        }
        delta = ""
        wins = ""
        if mode != args.baseline and shared:
            diffs = [nll[s] - base[s] for s in shared]
            d, se = mean_stderr(diffs)
            entry.update(
                delta_nll_mean=d, delta_nll_stderr=se, kd_wins=sum(x < 0 for x in diffs), paired_seeds=len(shared)
            )
            delta = fmt(d, se, 4)
            wins = f"{entry['kd_wins']} of {len(shared)}"
        out[f"{student}.{mode}"] = entry
        lines.append(
            f"| {student} | {mode} | {', '.join(f'{k} {v:g}' for k, v in entry['terms'].items())} | "
            f"{len(nll)} | {fmt(entry['ppl_mean'], entry['ppl_stderr'], 1)} | "
            f"{fmt(entry['nll_mean'], entry['nll_stderr'], 4)} | {delta} | {wins} | "
            f"{entry['train_seconds_mean']:.0f} |"
        )
    print("\n".join(lines))
    if init_ppl is not None:
        print(
            f"\nStudent before training: held-out ppl {init_ppl:.1f}. Δ NLL < 0 means the KD mode predicts the "
            f"held-out text better than {args.baseline} (paired by seed)."
        )
    print(
        json.dumps(
            {"config": args.configfile, "baseline": args.baseline, "student_init_ppl": init_ppl, "modes": out},
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which logit cache is best per byte? The outcome of config/study_logits.yaml, from the eval rule's records.

    snakemake --cores all --configfile config/study_logits.yaml --directory study_logits
    python bench/study_logits.py --configfile config/study_logits.yaml --study study_logits
    python bench/study_logits.py --settings ce,s12,s12sys,full ...   # some settings: only their runs need to exist
    python bench/study_logits.py --study study_logits study_logits_seed1 ...  # other draws of the same study

For every setting (a run group: student, mode, tag) of the config's runs: the held-out NLL per token, the top-1
agreement with the teacher and the KL(teacher‖student) of the eval rule (``results/eval/<run>/heldout.json``,
the whole held-out shard) as mean ± standard error over the seeds; the paired differences (same seed: same LoRA
init, same documents in the same order) to the no-KD runs (``--baseline`` mode) and to the online full-KD runs
(``teacher_logits.source: online``), mean ± standard error and wins; and the bytes per token of the logit cache the
setting read (its training shards' files over their tokens; none for the no-KD and online settings, which read
the study's cache for its tokens alone). Prints a Markdown table, then one JSON object as the last line: keys
``settings`` (a list of objects: ``name``, ``k``, ``samples``, ``sampling`` (multinomial or systematic, with
samples), ``source``, ``bytes_per_token``, ``seeds``, ``studies``, ``nll``, ``nll_se``, ``top1``, ``top1_se``,
``kl``, ``d_nll_vs_ce``, ``d_nll_vs_ce_se``, ``wins_vs_ce``,
``d_nll_vs_full``, ``d_nll_vs_full_se``, ``d_top1_vs_full``, ``d_top1_vs_full_se``), ``ranking`` (names by NLL,
best first) and ``best_per_byte`` (the cheapest cache setting whose NLL is within two standard errors of the
paired difference to full KD, or null).

Several ``--study`` directories: the same study with other ``teacher_cache.sample_seed`` values, i.e. other draws
of every sampled cache (the runs of one directory share one draw of each cache, so its seeds cannot see how much
the draw itself moves a student). A setting with draws is then paired by (study, seed), its standard errors are
those of the studies' means, and ``d_nll_vs_full_by_study`` lists each study's mean difference; a setting without
draws (no KD, top-k, online) ran identically in every directory and is read from the first.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdflow.config import load_config  # noqa: E402
from kdflow.eval_record import EvalRecord  # noqa: E402
from kdflow.plan import study_plan  # noqa: E402
from kdflow.plan_caches import parse_logit_name  # noqa: E402
from kdflow.runs import run_group  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def mean_se(values: list[float]) -> tuple[float, float | None]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def paired(
    a: dict[tuple, float], b: dict[tuple, float], draws: bool = True
) -> tuple[float | None, float | None, int, int]:
    """Mean and standard error of a − b over the (study, seed) keys both have; wins (a < b) and pairs compared.
    Keys of several studies (draw realisations): the standard error is that of the studies' means (the draws are
    the larger noise, and the seeds of one study share them); one study: over its seeds. ``draws`` False: neither
    side has draws, so the studies are copies of the first and only it counts."""
    keys = sorted(k for k in set(a) & set(b) if draws or k[0] == 0)
    if not keys:
        return None, None, 0, 0
    diffs = {key: a[key] - b[key] for key in keys}
    studies = sorted({key[0] for key in keys})
    if len(studies) > 1:
        means = [statistics.fmean(d for key, d in diffs.items() if key[0] == s) for s in studies]
        m, se = statistics.fmean(diffs.values()), statistics.stdev(means) / math.sqrt(len(means))
    else:
        m, se = mean_se(list(diffs.values()))
    return m, se, sum(d < 0 for d in diffs.values()), len(keys)


def broadcast(values: dict[tuple, float], studies: int) -> dict[tuple, float]:
    """A setting without draws (no KD, a top-k cache, the teacher online) ran once: its first study's values stand
    for every study (the same runs, the same bytes)."""
    return {(s, seed): v for s in range(studies) for (first, seed), v in values.items() if first == 0}


def cache_bytes_per_token(cache_dir: Path, shards: list[str]) -> float:
    files = [cache_dir / f"{s}.parquet" for s in shards]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"missing cache file {missing[0]}; run the study first")
    tokens = sum(sum(pq.read_table(f, columns=["n_tokens"]).column(0).to_pylist()) for f in files)
    return sum(f.stat().st_size for f in files) / tokens


def metrics_of(path: Path) -> dict[str, float]:
    if not path.is_file():
        sys.exit(f"{path}: missing; run the study first (snakemake --cores all --configfile … --directory …)")
    record = EvalRecord.from_json(json.loads(path.read_text()))
    return {m.metric: m.value for m in record.metrics}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default="config/study_logits.yaml")
    ap.add_argument(
        "--study",
        nargs="+",
        default=["study_logits"],
        help="the study's directory (snakemake's --directory); several: the same study at other "
        "teacher_cache.sample_seed values (other draws), pooled (docs/study_logits.md)",
    )
    ap.add_argument("--baseline", default="ce", help="the no-KD mode")
    ap.add_argument(
        "--settings",
        default=None,
        help="comma-separated setting names (tags, or the mode for an untagged group) to report, e.g. "
        "ce,s12,full: only their runs need to have run (default: every run of the config)",
    )
    args = ap.parse_args()
    studies = [Path(s) for s in args.study]
    plan = study_plan(load_config(args.configfile), REPO)
    shards = plan.shard_names(with_heldout=False)

    wanted = set(args.settings.split(",")) if args.settings else None
    known = {spec.tag or spec.mode for spec in plan.runs.values()}
    if wanted and (unknown := sorted(wanted - known)):
        sys.exit(f"--settings: {unknown} are no settings of {args.configfile} (its settings: {sorted(known)})")
    groups: dict[str, dict] = {}
    for name, spec in plan.runs.items():
        if wanted and (spec.tag or spec.mode) not in wanted:
            continue
        group = run_group(spec.student, spec.mode, spec.tag)
        g = groups.setdefault(group, {"spec": spec, "nll": {}, "top1": {}, "kl": {}})
        g["draws"] = (
            "rb" in spec.terms
            and spec.teacher_logits.source == "cache"
            and parse_logit_name(plan.logits_read(spec))[1] > 0
        )
        for s, study in enumerate(studies if g["draws"] else studies[:1]):
            m = metrics_of(study / "results/eval" / name / "heldout.json")
            g["nll"][s, spec.seed], g["top1"][s, spec.seed] = m["nll_per_token"], m["top1_agreement"]
            g["kl"][s, spec.seed] = m["kl_teacher_student"]
    for g in groups.values():
        if not g["draws"]:
            for key in ("nll", "top1", "kl"):
                g[key] = broadcast(g[key], len(studies))
    base = next((g for g in groups.values() if g["spec"].mode == args.baseline), None)
    full = next(
        (g for g in groups.values() if "rb" in g["spec"].terms and g["spec"].teacher_logits.source == "online"), None
    )

    rows = []
    for group, g in groups.items():
        spec = g["spec"]
        reads_logits = "rb" in spec.terms and spec.teacher_logits.source == "cache"
        logits = plan.logits_read(spec)
        k, samples, sampling = parse_logit_name(logits) if reads_logits else (None, None, None)
        row = {
            "name": spec.tag or spec.mode,
            "group": group,
            "k": k,
            "samples": samples,
            "sampling": sampling if samples else None,
            "source": spec.teacher_logits.source if "rb" in spec.terms else None,
            "missing_mass": spec.missing_mass if reads_logits else None,
            "bytes_per_token": round(
                statistics.fmean(cache_bytes_per_token(s / plan.cache_path(logits), shards) for s in studies), 2
            )
            if reads_logits
            else None,
            "seeds": len({seed for _, seed in g["nll"]}),
            "studies": len(studies) if g["draws"] else 1,
        }
        for key in ("nll", "top1", "kl"):
            m, se = mean_se([v for (s, _), v in g[key].items() if s == 0 or g["draws"]])
            row[key], row[f"{key}_se"] = round(m, 5), (round(se, 5) if se is not None else None)
        if g["draws"] and full is not None and len(studies) > 1:
            row["d_nll_vs_full_by_study"] = [
                round(paired({k: v for k, v in g["nll"].items() if k[0] == s}, full["nll"])[0], 5)
                for s in range(len(studies))
            ]
        for ref_name, ref in (("ce", base), ("full", full)):
            if ref is None or ref is g:
                continue
            draws = g["draws"] or ref["draws"]
            d, se, wins, n = paired(g["nll"], ref["nll"], draws)
            row[f"d_nll_vs_{ref_name}"], row[f"d_nll_vs_{ref_name}_se"] = round(d, 5), se and round(se, 5)
            row[f"wins_vs_{ref_name}"] = f"{wins} of {n}"
            if ref_name == "full":
                d, se, _, _ = paired(g["top1"], ref["top1"], draws)
                row["d_top1_vs_full"], row["d_top1_vs_full_se"] = round(d, 5), se and round(se, 5)
        rows.append(row)
    ranking = [r["name"] for r in sorted(rows, key=lambda r: r["nll"])]
    within = [
        r
        for r in rows
        if r["bytes_per_token"] is not None
        and r.get("d_nll_vs_full") is not None
        and r["d_nll_vs_full"] <= 2 * (r["d_nll_vs_full_se"] or 0)
    ]
    best = min(within, key=lambda r: r["bytes_per_token"])["name"] if within else None

    def pm(r: dict, key: str, digits: int = 4) -> str:
        if r.get(key) is None:
            return ""
        se = r.get(f"{key}_se")
        return f"{r[key]:+.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")

    head = ["setting", "k", "samples", "sampling", "B/token", "seeds", "NLL/token", "top-1", "KL(t‖s)", "Δ NLL vs ce"]
    head += ["Δ NLL vs full KD", "Δ top-1 vs full KD"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in sorted(rows, key=lambda r: r["nll"]):
        cells = [
            "" if r[key] is None else str(r[key])
            for key in ("name", "k", "samples", "sampling", "bytes_per_token", "seeds")
        ]
        cells += [f"{r['nll']:.4f} ± {r['nll_se'] or 0:.4f}", f"{r['top1']:.4f} ± {r['top1_se'] or 0:.4f}"]
        cells += [f"{r['kl']:.4f}", pm(r, "d_nll_vs_ce") + (f" ({r['wins_vs_ce']})" if "wins_vs_ce" in r else "")]
        by_study = ", ".join(f"{d:+.4f}" for d in r.get("d_nll_vs_full_by_study", []))
        cells += [
            pm(r, "d_nll_vs_full")
            + (f" ({r['wins_vs_full']})" if "wins_vs_full" in r else "")
            + (f" [by study: {by_study}]" if by_study else "")
        ]
        cells += [pm(r, "d_top1_vs_full")]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({"settings": rows, "ranking": ranking, "best_per_byte": best}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

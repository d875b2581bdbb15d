"""How long Snakemake takes to plan a study: the dry run of a config with the users' SLURM profile, beside the
dry run of a bare Snakefile with the same number of trivial jobs (Snakemake's own cost per job: the floor).

    python bench/dryrun.py                                   # config/llama70b.yaml, 3 rounds each, alternating
    python bench/dryrun.py --config config/config.yaml --rounds 1
    python bench/dryrun.py --floor-jobs 2100,4147       # also the bare floor at other job counts
    python bench/dryrun.py --directive-costs           # also what each directive of kdflow's rules costs

Nothing needs to exist: no model, no dataset (the dry run runs in an empty temporary directory). The last
line is one JSON object: dryrun_s (median seconds of `snakemake -n --profile profiles/slurm --configfile
CONFIG`), floor_s (median of the bare Snakefile), overhead_ratio (median over rounds of dry run / floor), jobs,
the rounds, and slurm_import_s: how long importing
snakemake-executor-plugin-slurm takes here (Snakemake imports it for every run; at import it asks `scontrol`
about the cluster, which waits about 9 s where SLURM's commands are installed but no controller answers, as on
a machine after `.ci/slurm/cluster.sh down`: both figures above then include that wait). With --floor-jobs,
floor_by_jobs adds the bare floor (median seconds) at each of those job counts: what Snakemake alone needs for a
DAG of that size, e.g. one with fewer jobs per shard.

The same study with data.n_shards = --at-shards (default 2048; a second --configfile overrides it) is timed in
the same rounds beside the floor at its job count: jobs_2048, dryrun_2048_s, floor_2048_s and
overhead_ratio_2048, kdflow's planning cost per job against Snakemake's own for a study that does need
thousands of shards (the keys keep their names for another --at-shards; at_shards says which). Beside them,
floor_script_2048_s: the bare Snakefile whose trivial jobs are `script:` rules, as kdflow's are, and
script_floor_ratio_2048 = that / floor_2048_s: the part of the ratio that is Snakemake's own cost of a `script:`
job in a dry run (it reads every job's script through its source cache). And floor_shaped_2048_s: a Snakefile
of kdflow's own rule shapes (per shard a shard job and the two cache jobs, with the same directives: named
inputs and outputs, params, threads, log, benchmark, conda, script) and no kdflow code, dry-run with the same
profile (jobs_shaped_2048 jobs): shaped_floor_ratio_2048 = that / floor_2048_s is what Snakemake itself costs per
job for those directives and resources, and overhead_over_shaped_2048 = dryrun_2048_s / floor_shaped_2048_s is
what kdflow's code (the plan, the input functions, the other rules) adds on top. And floor_profile_2048_s: the
bare Snakefile dry-run with the same SLURM profile as the study (the bare floor runs with --cores 1):
profile_floor_ratio_2048 = that / floor_2048_s is what the profile alone costs per job (its resources evaluated and
printed for every job, the SLURM executor), and overhead_over_profile_floor_2048 = dryrun_2048_s /
floor_profile_2048_s is kdflow's per-job cost over Snakemake's with the same profile. With --directive-costs, the
shaped Snakefile is also dry-run with each of its directive groups taken out in turn (`script` becomes `shell:`,
`log_benchmark`, `conda`, `params`, `teacher_input`: the second input of the cache jobs) and with all of them taken
out (`all`): shaped_without_2048_s (median seconds by name) and shaped_without_ratio_2048 (each / floor_2048_s),
what Snakemake charges per job for each directive kdflow's rules carry.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BARE = """
N = {n}
rule all:
    input: expand("out/{{i}}.done", i=range(N))
rule job:
    input: "in.txt"
    output: "out/{{i}}.done"
    shell: "touch {{output}}"
"""


# The same, each job a `script:` rule (as every kdflow rule is): what Snakemake itself adds per script job in a dry
# run (it reads each job's script through its source cache to check that it is accessible).
BARE_SCRIPT = BARE.replace('shell: "touch {{output}}"', 'script: "touch.py"')


# kdflow's own rule shapes without kdflow: per shard a `shard` job and the two cache jobs, with the directives
# kdflow's rules carry (named inputs and outputs, a shared teacher manifest, params, threads, log, benchmark,
# conda, script), dry-run with the same SLURM profile (so the same resources per job). What Snakemake itself
# needs for a DAG of kdflow's shape; the study's time beyond it is kdflow's code (the plan, the input functions).
SHAPED = """
N = {n}
rule all:
    input: expand("cache/topk/{{i}}.parquet", i=range(N)), expand("cache/hidden/{{i}}.parquet", i=range(N))
rule shard:
    input: corpus="in.txt"
    output: shard="shards/{{i}}.parquet"
    log: "logs/shard/{{i}}.log"
    conda: "env.yaml"
    script: "touch.py"
rule topk_cache:
    input: shard="shards/{{i}}.parquet", teacher="manifest.json"
    output: topk="cache/topk/{{i}}.parquet", embed="cache/embed/{{i}}.parquet"
    params: settings={settings!r}, partial="cache/topk/{{i}}.parts"
    threads: 1
    log: "logs/topk_cache/{{i}}.log"
    benchmark: "benchmarks/topk_cache/{{i}}.tsv"
    conda: "env.yaml"
    script: "touch.py"
rule hidden_cache:
    input: shard="shards/{{i}}.parquet", teacher="manifest.json"
    output: hidden="cache/hidden/{{i}}.parquet"
    params: settings={settings!r}, partial="cache/hidden/{{i}}.parts"
    threads: 1
    log: "logs/hidden_cache/{{i}}.log"
    benchmark: "benchmarks/hidden_cache/{{i}}.tsv"
    conda: "env.yaml"
    script: "touch.py"
"""
# a cache job's settings as the plan gives them (their size, not their values, is what a dry run pays for)
SHAPED_SETTINGS = {
    "teacher": "teacher",
    "k": 64,
    "batch_size": 8,
    "max_length": 2048,
    "dtype": "bfloat16",
    "device": "cuda",
    "parallel": "tensor",
    "tp_size": None,
    "layers": [-1],
    "pooling": "mean",
    "seed": 0,
    "threads": 1,
}


# What each of those directives costs Snakemake (--directive-costs): the shaped floor with one of them taken out
# (`script:` becoming `shell:`), and with all of them taken out. Each is a change of the Snakefile's text.
def _without_lines(*prefixes: str):
    def edit(text: str) -> str:
        return "\n".join(line for line in text.splitlines() if not line.strip().startswith(prefixes))

    return edit


WITHOUT = {
    "script": lambda text: text.replace('script: "touch.py"', 'shell: "touch {{output}}"'),
    "log_benchmark": _without_lines("log:", "benchmark:"),
    "conda": _without_lines("conda:"),
    "params": _without_lines("params:"),
    "teacher_input": lambda text: text.replace(', teacher="manifest.json"', ""),
}


def shaped_without(names: list[str]) -> str:
    """The shaped Snakefile's text with the directives `names` (keys of WITHOUT) taken out."""
    text = SHAPED
    for name in names:
        text = WITHOUT[name](text)
    return text


def shaped_snakefile(directory: Path, shards: int, text: str = SHAPED) -> list[str]:
    """Write a Snakefile of kdflow's rule shapes over `shards` shards (3 * shards + 1 jobs) in `directory` (the
    text of SHAPED, or one edited by shaped_without); the command that dry-runs it with the SLURM profile."""
    directory.mkdir(exist_ok=True)
    (directory / "touch.py").write_text("from pathlib import Path\n\nPath(snakemake.output[0]).touch()\n")
    (directory / "env.yaml").write_text("channels: [conda-forge]\ndependencies: [python]\n")
    for name in ("in.txt", "manifest.json"):
        (directory / name).write_text("")
    (directory / "Snakefile").write_text(text.format(n=shards, settings=SHAPED_SETTINGS))
    return [
        sys.executable, "-m", "snakemake", "-s", str(directory / "Snakefile"), "-d", str(directory), "-n",
        "--profile", str(REPO / "profiles/slurm"),
    ]  # fmt: skip


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout + proc.stderr


def bare_snakefile(bare: Path, jobs: int, name: str = "Snakefile", script: bool = False) -> list[str]:
    """Write a Snakefile of `jobs` jobs (`all` and jobs - 1 trivial ones) in `bare`; the command to dry-run it.
    ``script``: the trivial jobs are `script:` rules (touch.py) instead of `shell:` ones."""
    if script:
        (bare / "touch.py").write_text("from pathlib import Path\n\nPath(snakemake.output[0]).touch()\n")
    (bare / name).write_text((BARE_SCRIPT if script else BARE).format(n=jobs - 1))
    return [sys.executable, "-m", "snakemake", "-s", str(bare / name), "-d", str(bare), "-n", "--cores", "1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/llama70b.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--at-shards",
        type=int,
        default=2048,
        help="also dry-run the same study with data.n_shards set to this, beside the floor at its job count "
        "(overhead_ratio_2048; 0: skip)",
    )
    ap.add_argument(
        "--floor-jobs",
        default="",
        metavar="N,N,...",
        help="also time the bare Snakefile at these job counts (floor_by_jobs)",
    )
    ap.add_argument(
        "--directive-costs",
        action="store_true",
        help="also dry-run kdflow's rule shapes with each directive taken out in turn, and with all of them "
        "(shaped_without_2048_s; needs --at-shards)",
    )
    args = ap.parse_args()
    if args.directive_costs and not args.at_shards:
        ap.error("--directive-costs times Snakefiles at --at-shards shards: give --at-shards a count, not 0")
    try:
        floor_jobs = [int(n) for n in args.floor_jobs.split(",") if n.strip()]
    except ValueError:
        ap.error(f"--floor-jobs {args.floor_jobs!r}: give job counts separated by commas, e.g. 2100,4147")
    if any(n < 2 for n in floor_jobs):
        ap.error(f"--floor-jobs {args.floor_jobs!r}: every job count must be at least 2 (`all` and one job)")
    config = (REPO / args.config).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        study, bare = Path(tmp) / "study", Path(tmp) / "bare"
        study.mkdir()
        bare.mkdir()
        real_cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(study),
            "-n",
            "--profile",
            str(REPO / "profiles/slurm"),
            "--configfile",
            str(config),
        ]
        jobs = job_count(timed(real_cmd, study)[1])
        # the bare Snakefile has `all` plus jobs - 1 jobs, like the study (whose `all` is one of its jobs)
        (bare / "in.txt").write_text("")
        bare_cmd = bare_snakefile(bare, jobs)
        slurm_import = timed([sys.executable, "-c", "import snakemake_executor_plugin_slurm"], bare)[0]
        many_cmd = many_bare = None
        if args.at_shards:
            override = Path(tmp) / f"n_shards_{args.at_shards}.yaml"
            override.write_text(f"data:\n  n_shards: {args.at_shards}\n")
            many_cmd = [*real_cmd, str(override)]  # --configfile takes both files; the second wins
            many_jobs = job_count(timed(many_cmd, study)[1])
            many_bare = bare_snakefile(bare, many_jobs, name="Snakefile.many")
            many_script = bare_snakefile(bare, many_jobs, name="Snakefile.many_script", script=True)
            # the same bare Snakefile under the users' SLURM profile: what the profile alone costs per job
            many_profile = [x for x in many_bare if x not in ("--cores", "1")]
            many_profile += ["--profile", str(REPO / "profiles/slurm")]
            shaped = shaped_snakefile(Path(tmp) / "shaped", args.at_shards)
            shaped_jobs = job_count(timed(shaped, Path(tmp) / "shaped")[1])
            variants = {}
            if args.directive_costs:
                for name in [*WITHOUT, "all"]:
                    text = shaped_without(list(WITHOUT) if name == "all" else [name])
                    variants[name] = shaped_snakefile(Path(tmp) / f"shaped_without_{name}", args.at_shards, text)
                    timed(variants[name], Path(tmp) / f"shaped_without_{name}")  # untimed: a first run
            without = {name: [] for name in variants}
        real, floor, many, many_floor, many_script_floor, many_shaped, many_profile_floor = [], [], [], [], [], [], []
        for r in range(args.rounds):
            real.append(timed(real_cmd, study)[0])
            floor.append(timed(bare_cmd, bare)[0])
            line = f"round {r}: dry run {real[-1]:.1f} s, bare Snakefile {floor[-1]:.1f} s"
            if many_cmd:
                many.append(timed(many_cmd, study)[0])
                many_floor.append(timed(many_bare, bare)[0])
                many_script_floor.append(timed(many_script, bare)[0])
                many_shaped.append(timed(shaped, Path(tmp) / "shaped")[0])
                many_profile_floor.append(timed(many_profile, bare)[0])
                for name, cmd in variants.items():
                    without[name].append(timed(cmd, Path(tmp) / f"shaped_without_{name}")[0])
                line += (
                    f"; at {args.at_shards} shards {many[-1]:.1f} s, bare {many_floor[-1]:.1f} s, "
                    f"bare with script: rules {many_script_floor[-1]:.1f} s, kdflow's rule shapes without "
                    f"kdflow {many_shaped[-1]:.1f} s, bare with the SLURM profile {many_profile_floor[-1]:.1f} s"
                )
                line += "".join(f", shapes without {name} {times[-1]:.1f} s" for name, times in without.items())
            print(line, file=sys.stderr)
        by_jobs = {}
        for n in floor_jobs:
            cmd = bare_snakefile(bare, n, name=f"Snakefile.{n}")
            by_jobs[str(n)] = round(statistics.median(timed(cmd, bare)[0] for _ in range(args.rounds)), 2)
            print(f"bare Snakefile of {n} jobs: {by_jobs[str(n)]:.1f} s", file=sys.stderr)
    result = {
        "config": args.config,
        "jobs": jobs,
        "dryrun_s": round(statistics.median(real), 2),
        "floor_s": round(statistics.median(floor), 2),
        "overhead_ratio": ratio(real, floor),
        "dryrun_rounds": [round(x, 2) for x in real],
        "floor_rounds": [round(x, 2) for x in floor],
        "slurm_import_s": round(slurm_import, 2),
        "floor_by_jobs": by_jobs,
    }
    if many:
        result.update(
            {
                "at_shards": args.at_shards,
                "jobs_2048": many_jobs,
                "dryrun_2048_s": round(statistics.median(many), 2),
                "floor_2048_s": round(statistics.median(many_floor), 2),
                "overhead_ratio_2048": ratio(many, many_floor),
                "floor_script_2048_s": round(statistics.median(many_script_floor), 2),
                "script_floor_ratio_2048": ratio(many_script_floor, many_floor),
                "jobs_shaped_2048": shaped_jobs,
                "floor_shaped_2048_s": round(statistics.median(many_shaped), 2),
                "shaped_floor_ratio_2048": ratio(many_shaped, many_floor),
                "overhead_over_shaped_2048": ratio(many, many_shaped),
                "floor_profile_2048_s": round(statistics.median(many_profile_floor), 2),
                "profile_floor_ratio_2048": ratio(many_profile_floor, many_floor),
                "overhead_over_profile_floor_2048": ratio(many, many_profile_floor),
                **(
                    {
                        "shaped_without_2048_s": {n: round(statistics.median(t), 2) for n, t in without.items()},
                        "shaped_without_ratio_2048": {n: ratio(t, many_floor) for n, t in without.items()},
                    }
                    if without
                    else {}
                ),
                "dryrun_2048_rounds": [round(x, 2) for x in many],
                "floor_2048_rounds": [round(x, 2) for x in many_floor],
            }
        )
    print(json.dumps(result))


def job_count(dry_run_output: str) -> int:
    return int(re.search(r"^total\s+(\d+)$", dry_run_output, re.M).group(1))


def ratio(real: list[float], floor: list[float]) -> float:
    """The median of the per-round ratios (each round times both side by side)."""
    return round(statistics.median(r / f for r, f in zip(real, floor, strict=True)), 3)


if __name__ == "__main__":
    main()

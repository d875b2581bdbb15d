"""How long Snakemake takes to plan a study: the dry run of a config with the users' SLURM profile, beside the
dry run of a bare Snakefile with the same number of trivial jobs (Snakemake's own cost per job: the floor).

    python bench/dryrun.py                                   # config/llama70b.yaml, 3 rounds each, alternating
    python bench/dryrun.py --config config/config.yaml --rounds 1
    python bench/dryrun.py --floor-jobs 2100,4147       # also the bare floor at other job counts

Nothing needs to exist: no model, no dataset (the dry run runs in an empty temporary directory). The last
line is one JSON object: dryrun_s (median seconds of `snakemake -n --profile profiles/slurm --configfile
CONFIG`), floor_s (median of the bare Snakefile), jobs, the rounds, and slurm_import_s: how long importing
snakemake-executor-plugin-slurm takes here (Snakemake imports it for every run; at import it asks `scontrol`
about the cluster, which waits about 9 s where SLURM's commands are installed but no controller answers, as on
a machine after `.ci/slurm/cluster.sh down`: both figures above then include that wait). With --floor-jobs,
floor_by_jobs adds the bare floor (median seconds) at each of those job counts: what Snakemake alone needs for a
DAG of that size, e.g. one with fewer jobs per shard.
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


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout + proc.stderr


def bare_snakefile(bare: Path, jobs: int, name: str = "Snakefile") -> list[str]:
    """Write a Snakefile of `jobs` jobs (`all` and jobs - 1 trivial ones) in `bare`; the command to dry-run it."""
    (bare / name).write_text(BARE.format(n=jobs - 1))
    return [sys.executable, "-m", "snakemake", "-s", str(bare / name), "-d", str(bare), "-n", "--cores", "1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/llama70b.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--floor-jobs",
        default="",
        metavar="N,N,...",
        help="also time the bare Snakefile at these job counts (floor_by_jobs)",
    )
    args = ap.parse_args()
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
        _, out = timed(real_cmd, study)
        jobs = int(re.search(r"^total\s+(\d+)$", out, re.M).group(1))
        # the bare Snakefile has `all` plus jobs - 1 jobs, like the study (whose `all` is one of its jobs)
        (bare / "in.txt").write_text("")
        bare_cmd = bare_snakefile(bare, jobs)
        slurm_import = timed([sys.executable, "-c", "import snakemake_executor_plugin_slurm"], bare)[0]
        real, floor = [], []
        for r in range(args.rounds):
            real.append(timed(real_cmd, study)[0])
            floor.append(timed(bare_cmd, bare)[0])
            print(f"round {r}: dry run {real[-1]:.1f} s, bare Snakefile {floor[-1]:.1f} s", file=sys.stderr)
        by_jobs = {}
        for n in floor_jobs:
            cmd = bare_snakefile(bare, n, name=f"Snakefile.{n}")
            by_jobs[str(n)] = round(statistics.median(timed(cmd, bare)[0] for _ in range(args.rounds)), 2)
            print(f"bare Snakefile of {n} jobs: {by_jobs[str(n)]:.1f} s", file=sys.stderr)
    print(
        json.dumps(
            {
                "config": args.config,
                "jobs": jobs,
                "dryrun_s": round(statistics.median(real), 2),
                "floor_s": round(statistics.median(floor), 2),
                "dryrun_rounds": [round(x, 2) for x in real],
                "floor_rounds": [round(x, 2) for x in floor],
                "slurm_import_s": round(slurm_import, 2),
                "floor_by_jobs": by_jobs,
            }
        )
    )


if __name__ == "__main__":
    main()

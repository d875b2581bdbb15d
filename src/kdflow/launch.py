"""Starting a training run on the GPUs and nodes SLURM granted, with torchrun (torch.distributed.run).

:func:`launch_training` is what the train rule calls: with one GPU or none (or inside a launcher, ``WORLD_SIZE``
set) it trains in this process; otherwise it writes the job file and runs :func:`launch_command`.
Every launched process runs ``python -m kdflow.train JOB.json`` (:mod:`kdflow.train.__main__`).

One node: the train rule runs ``torchrun --standalone --nproc_per_node=G -m kdflow.train JOB.json`` itself.
Several nodes: the rule runs ``srun --nodes=N --ntasks=N --ntasks-per-node=1 python -m kdflow.launch JOB.json G``,
one task per node; each task (this module) reads what srun tells it (``SLURM_NNODES``, ``SLURM_NODEID``,
``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``) and becomes ``torchrun --nnodes=N --node_rank=I --nproc_per_node=G
--rdzv_backend=c10d --rdzv_endpoint=<first node>:<port> --rdzv_id=<job id> -m kdflow.train JOB.json``, so that
every node's G processes meet at the first node. No home-made process management: torchrun starts, watches
and tears down the ranks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdflow.errors import KdflowError

if TYPE_CHECKING:  # kdflow.train pulls in torch; a per-node launcher task only execs torchrun
    from kdflow.train import TrainJob

RDZV_PORT = 29500
SRC = str(Path(__file__).parents[1])  # this checkout's package, for the launched processes


class LaunchError(KdflowError, RuntimeError):
    pass


def torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def single_node_command(job_file: str | Path, nproc: int, module: str = "kdflow.train") -> list[str]:
    """torchrun starting ``nproc`` processes of ``python -m module JOB`` on this node (the training entry point,
    or a tensor-parallel teacher job's ranks: kdflow.teacher_parallel)."""
    return torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", module, str(job_file)])


def run_launched(cmd: list[str], what: str, resume: str, env: Mapping[str, str] | None = None) -> None:
    """Run a launcher command (torchrun, srun) with this checkout's package on ``PYTHONPATH`` and wait; a non-zero
    exit (a rank failed or was killed: torchrun then stops the others) is a :class:`LaunchError` saying ``what``
    failed and ``resume``: what a rerun picks up."""
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, base.get("PYTHONPATH")]))
    logging.getLogger("kdflow.launch").info("launching %s", " ".join(cmd))
    status = subprocess.run(cmd, env=base).returncode
    if status != 0:
        raise LaunchError(
            f"{what}: {Path(cmd[0]).name} {' '.join(cmd[1:3])} … exited with status {status}; each failed rank "
            f"logged why above (lines 'rank<N> ERROR'; a rank killed by a signal logs nothing: see torchrun's lines). "
            f"{resume}"
        )


def multi_node_command(job_file: str | Path, nproc_per_node: int, nodes: int) -> list[str]:
    """srun starting one launcher task per node of the job's allocation (each becomes a torchrun)."""
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "kdflow.launch",
        str(job_file),
        str(nproc_per_node),
    ]


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compact host list (``gpu[01-03,07],login1``) as host names, in order."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST {hostlist!r}: no host names in it")
    return hosts


def node_command(job_file: str | Path, nproc_per_node: int, env: Mapping[str, str]) -> list[str]:
    """The torchrun line for this node of a multi-node job, from the variables srun sets in each task."""
    missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID") if k not in env]
    if missing:
        raise LaunchError(
            f"python -m kdflow.launch runs inside `srun` (one task per node); {', '.join(missing)} not set"
        )
    nodes, rank = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
    head = expand_hostlist(env["SLURM_JOB_NODELIST"])[0]
    port = int(env.get("KDFLOW_RDZV_PORT", RDZV_PORT))
    return torchrun(
        [
            f"--nnodes={nodes}",
            f"--node_rank={rank}",
            f"--nproc_per_node={nproc_per_node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={head}:{port}",
            f"--rdzv_id={env['SLURM_JOB_ID']}",
            "-m",
            "kdflow.train",
            str(job_file),
        ]
    )


def launch_command(job_file: str | Path, nproc: int, nodes: int = 1) -> list[str]:
    """How the train rule starts ``nproc`` processes per node on ``nodes`` nodes: torchrun on this node, or srun
    with one torchrun per node."""
    return single_node_command(job_file, nproc) if nodes <= 1 else multi_node_command(job_file, nproc, nodes)


def launch_training(job: TrainJob, gpus_per_node: int = 0, nodes: int = 1) -> dict[str, Any]:
    """Train ``job`` and return its summary. One GPU or none on one node, or already one rank of a launcher
    (``WORLD_SIZE`` set): in this process, printing the summary as one JSON line. Otherwise: the job goes to
    ``<work>/job.json`` and :func:`launch_command` runs it (one process per GPU, this package on ``PYTHONPATH``);
    the summary is then read from the run directory (rank 0 printed it)."""
    if (gpus_per_node > 1 or nodes > 1) and "WORLD_SIZE" not in os.environ:
        job_file = Path(job.work) / "job.json"
        job_file.parent.mkdir(parents=True, exist_ok=True)
        job.save(job_file)
        cmd = launch_command(job_file, max(1, gpus_per_node), nodes)
        run_launched(cmd, f"run {job.spec['name']!r}", f"A rerun resumes from the newest checkpoint in {job.work}")
        return json.loads((Path(job.output) / "summary.json").read_text(encoding="utf-8"))
    from kdflow.train import run_training

    summary = run_training(job)
    print(json.dumps(summary, sort_keys=True, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m kdflow.launch JOB.json GPUS_PER_NODE``: one srun task of a multi-node job becomes its torchrun."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m kdflow.launch JOB.json GPUS_PER_NODE   (one srun task per node)", file=sys.stderr)
        return 2
    cmd = node_command(argv[0], int(argv[1]), os.environ)
    print(f"kdflow.launch node {os.environ['SLURM_NODEID']}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

"""Rule train: one LoRA student run (see kdflow.train). More than one GPU in the job's resources: torchrun
starts one process per GPU on this node, each running the same entry point; more than one node: srun starts
one torchrun per node (kdflow.launch)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

import json
import logging
import os
import subprocess

from kdflow.cache_index import index_files
from kdflow.logs import run_logged
from kdflow.telemetry import job_telemetry
from kdflow.train import TrainJob, launch_command, run_training

sm = snakemake  # noqa: F821
SRC = str(Path(sm.scriptdir).parents[1] / "src")


def shard_files():
    """Per training shard, its file of each cache this run reads (from the caches' index files)."""
    topk = index_files(sm.input.topk)
    embed = index_files(sm.input.embed) if "embed" in sm.input.keys() else [None] * len(topk)
    hidden = index_files(sm.input.hidden) if "hidden" in sm.input.keys() else [None] * len(topk)
    return [{"topk": t, "embed": e, "hidden": h} for t, e, h in zip(topk, embed, hidden, strict=True)]


def main():
    nodes = int(sm.resources.get("nodes", 1) or 1)
    gpus = int(sm.resources.get("gpu", 0) or 0) // nodes  # per node
    job = TrainJob(spec=dict(sm.params.spec), student_manifest=sm.input.student, shards=shard_files(),
                   expected=dict(sm.params.expected), output=sm.output.run, work=sm.params.work,
                   heldout=sm.input.heldout, threads=max(1, sm.threads // max(1, gpus)))
    # one telemetry file per job: rank 0 (or the launcher, whose sampling covers every GPU of the node) writes it
    with job_telemetry(sm, enabled=os.environ.get("RANK", "0") == "0") as tel:
        if (gpus > 1 or nodes > 1) and "WORLD_SIZE" not in os.environ:
            job_file = Path(sm.params.work) / "job.json"
            job_file.parent.mkdir(parents=True, exist_ok=True)
            job.save(job_file)
            cmd = launch_command(job_file, max(1, gpus), nodes)
            logging.getLogger("kdflow.train").info("launching %s", " ".join(cmd))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))
            subprocess.run(cmd, check=True, env=env)
            tel.tokens = json.loads((Path(sm.output.run) / "summary.json").read_text(encoding="utf-8"))["tokens"]
            return
        summary = run_training(job)
        tel.tokens = summary["tokens"]
    print(json.dumps(summary, sort_keys=True, default=str))


run_logged(sm.log[0], main)

"""Rule train: one LoRA student run (kdflow.train), in this process or, with more than one GPU or node in the
job's resources, under torchrun / srun + torchrun (kdflow.launch.launch_training)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

import os

from kdflow.launch import launch_training
from kdflow.logs import run_logged
from kdflow.telemetry import job_telemetry
from kdflow.train import TrainJob, training_shards

sm = snakemake  # noqa: F821


def main():
    nodes = int(sm.resources.get("nodes", 1) or 1)
    gpus = int(sm.resources.get("gpu", 0) or 0) // nodes  # per node
    shards = training_shards(
        sm.input.topk,
        sm.input.embed if "embed" in sm.input.keys() else None,
        sm.input.hidden if "hidden" in sm.input.keys() else None,
    )
    job = TrainJob(
        spec=dict(sm.params.spec),
        student_manifest=sm.input.student,
        shards=shards,
        expected=dict(sm.params.expected),
        output=sm.output.run,
        work=sm.params.work,
        heldout=sm.input.heldout,
        threads=max(1, sm.threads // max(1, gpus)),
        teacher_manifest=getattr(sm.input, "teacher", None),  # a run with the teacher online
    )
    # one telemetry file per job: rank 0 (or the launcher, whose sampling covers every GPU of the node) writes it
    with job_telemetry(sm, enabled=os.environ.get("RANK", "0") == "0") as tel:
        tel.tokens = launch_training(job, gpus_per_node=gpus, nodes=nodes)["tokens"]


run_logged(sm.log[0], main)

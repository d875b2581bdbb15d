"""Tensor-parallel teacher jobs (``teacher_cache.parallel: tensor``): one rank per GPU, every GPU computing.

With ``device_map`` a teacher larger than one GPU has its layers placed on the GPUs one after another, so one
GPU computes while the others wait. With ``tensor`` each layer is split over all ranks by transformers'
tensor-parallel plan (attention heads and MLP columns; an all-reduce after each block), and every rank runs
every forward.

How a cache job runs that way (:func:`run_on_ranks`, from kdflow.teacher_pass.run_cache_rule):

1. the rule's process writes the job to ``<partial_dir>.job.json`` and starts ``torchrun --standalone
   --nproc_per_node=N -m kdflow.cache_rank JOB`` (kdflow.launch.run_launched), N = :func:`job_ranks`;
2. each rank (kdflow.cache_rank) initialises the process group (:func:`init_ranks`: NCCL on GPU ``LOCAL_RANK``,
   gloo on CPU), loads its slice of the teacher (kdflow.models.load_model with ``tp_size``) and runs the same
   pass as a single process (kdflow.teacher_pass): the same parts in the same order, rank 0 deciding which are
   finished; rank 0 alone writes the parts, the outputs and its summary (``<partial_dir>.result.json``);
3. the rule's process reads the summary. A rank that fails or is killed makes torchrun stop the others and exit
   non-zero: the job fails with a LaunchError, and the parts rank 0 finished stay for the rerun to resume from.

The teacher's held-out perplexity in prepare_models runs on the same ranks (:func:`run_on_ranks`, a perplexity
task: kdflow.prepare).

Each rank's log lines (``rank<N>``) go to stderr and are appended to the rule's log file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kdflow.atomic import write_json
from kdflow.errors import KdflowError
from kdflow.launch import run_launched, single_node_command

log = logging.getLogger(__name__)


class ParallelError(KdflowError, RuntimeError):
    pass


def job_ranks(settings: dict[str, Any]) -> int:
    """The ranks of a cache job: 1 unless ``parallel`` is tensor; then ``tp_size``, or one per visible GPU."""
    if settings.get("parallel") != "tensor":
        return 1
    gpus = torch.cuda.device_count() if settings["device"] != "cpu" else 0
    if settings["device"] != "cpu" and gpus == 0:
        raise ParallelError(
            f"teacher_cache.parallel: tensor with device {settings['device']!r}, but this job sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); give the teacher jobs GPUs "
            f"(profiles/slurm: KDFLOW_TEACHER_GPUS) or set teacher_cache.device: cpu with tp_size"
        )
    ranks = settings["tp_size"] if settings["tp_size"] is not None else gpus
    if settings["device"] != "cpu" and ranks > gpus:
        raise ParallelError(
            f"teacher_cache.tp_size: {ranks} ranks, but this job sees {gpus} GPU(s); one rank runs on each GPU: give "
            f"the teacher jobs {ranks} GPUs (profiles/slurm: KDFLOW_TEACHER_GPUS) or set tp_size to {gpus}"
        )
    return ranks


def init_ranks(device: str) -> torch.device:
    """This rank's device, with the process group initialised (torchrun's ``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_RANK``): GPU ``LOCAL_RANK`` and NCCL, or the CPU and gloo."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return dev


def job_files(work: Path) -> tuple[Path, Path]:
    """Where the rule's process leaves a task for the ranks, and where rank 0 leaves its result: beside ``work``
    (a cache job's partial directory, a prepared model's manifest)."""
    return Path(f"{work}.job.json"), Path(f"{work}.result.json")


def run_on_ranks(
    task: dict[str, Any],
    work: Path,
    ranks: int,
    device: str,
    what: str,
    resume: str,
    threads: int | None = None,
    log_file: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``task`` (kdflow.cache_rank: a cache job or a held-out perplexity) on ``ranks`` tensor-parallel ranks
    (torchrun on this node) and return rank 0's result; ``what`` and ``resume`` go into the error of a failed run."""
    job_file, result_file = job_files(work)
    result_file.unlink(missing_ok=True)
    per_rank = max(1, (threads or os.cpu_count() or 1) // ranks) if device == "cpu" else 1
    spec = {"task": task, "device": device, "log_file": str(log_file) if log_file else None, "threads": per_rank}
    write_json(job_file, {**spec, "result_file": str(result_file)})
    env = dict(os.environ, OMP_NUM_THREADS=str(per_rank))
    run_launched(single_node_command(job_file, ranks, module="kdflow.cache_rank"), what, resume, env=env)
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ParallelError(f"{result_file}: every rank exited 0 but rank 0 left no result ({e})") from None
    result_file.unlink()
    job_file.unlink(missing_ok=True)
    return result

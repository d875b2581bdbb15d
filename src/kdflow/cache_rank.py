"""``python -m kdflow.cache_rank JOB.json``: one rank of a tensor-parallel cache job (kdflow.teacher_parallel
says how such a job runs; torchrun starts the ranks). Its log lines (``rank<N>``) go to stderr and are appended
to the rule's log file."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from kdflow.atomic import write_json
from kdflow.cache_job import CacheJob
from kdflow.logs import DATE_FORMAT, FAILED_EXIT, log_failure
from kdflow.teacher_parallel import init_ranks, job_files
from kdflow.teacher_pass import capture_hidden, capture_topk


def _logging(rank: str, log_file: str | None) -> None:
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s", DATE_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == "0" else logging.WARNING)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdflow.cache_rank JOB.json``: one rank of a tensor-parallel cache job (torchrun starts it)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or "WORLD_SIZE" not in os.environ:
        print("usage: torchrun --nproc_per_node=N -m kdflow.cache_rank JOB.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    rank = os.environ.get("RANK", "0")
    _logging(rank, spec["log_file"])
    job = CacheJob.from_json(spec["job"])
    try:
        torch.set_num_threads(spec["threads"])
        init_ranks(job.settings["device"])
        summary = capture_topk(job) if job.kind == "topk" else capture_hidden(job)
        if summary is not None:  # rank 0
            write_json(job_files(job)[1], summary)
    except Exception as e:  # one record, on every rank that fails: kdflow's message, or the traceback
        log_failure(logging.getLogger("kdflow.cache_rank"), e)
        return FAILED_EXIT
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m kdflow.cache_rank JOB.json``: one rank of a tensor-parallel teacher task (kdflow.teacher_parallel
says how such a task runs; torchrun starts the ranks): a cache job (kdflow.teacher_pass) or the teacher's held-out
perplexity for prepare_models (kdflow.perplexity). Its log lines (``rank<N>``) go to stderr and are appended to the
rule's log file; rank 0 writes the result where the job file says."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from kdflow.atomic import write_json
from kdflow.cache_job import CacheJob, rank_of_ranks
from kdflow.logs import DATE_FORMAT, FAILED_EXIT, log_failure
from kdflow.manifest import Weights
from kdflow.models import load_model, load_tokenizer
from kdflow.perplexity import perplexity
from kdflow.teacher_parallel import init_ranks
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


def run_cache_task(task: dict[str, Any]) -> dict[str, Any] | None:
    job = CacheJob.from_json(task["job"])
    return capture_topk(job) if job.kind == "topk" else capture_hidden(job)


def run_perplexity_task(task: dict[str, Any]) -> dict[str, Any] | None:
    """The held-out perplexity of the teacher's weights (``task``: weights, dtype, texts, max_length, batch_size,
    name), with its layer and parameter counts; None on ranks other than 0."""
    weights = Weights(**task["weights"])
    tokenizer = load_tokenizer(weights)
    model = load_model(weights, "cpu", task["dtype"], tp_size=rank_of_ranks()[1])
    result = perplexity(
        model,
        tokenizer,
        task["texts"],
        max_length=task["max_length"],
        batch_size=task["batch_size"],
        desc=f"held-out ppl {task['name']}",
    )
    result["num_layers"] = model.config.num_hidden_layers
    result["num_parameters"] = sum(p.numel() for p in model.parameters())  # a split parameter counts whole
    return result if rank_of_ranks()[0] == 0 else None


def main(argv: list[str] | None = None) -> int:
    """``python -m kdflow.cache_rank JOB.json``: one rank of a tensor-parallel cache job (torchrun starts it)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or "WORLD_SIZE" not in os.environ:
        print("usage: torchrun --nproc_per_node=N -m kdflow.cache_rank JOB.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    rank = os.environ.get("RANK", "0")
    _logging(rank, spec["log_file"])
    task = spec["task"]
    try:
        torch.set_num_threads(spec["threads"])
        init_ranks(spec["device"])
        result = run_cache_task(task) if task["kind"] == "cache" else run_perplexity_task(task)
        if result is not None:  # rank 0
            write_json(spec["result_file"], result)
    except Exception as e:  # one record, on every rank that fails: kdflow's message, or the traceback
        log_failure(logging.getLogger("kdflow.cache_rank"), e)
        return FAILED_EXIT
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

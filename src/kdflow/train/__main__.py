"""``python -m kdflow.train JOB.json``: what torchrun starts in every process (and what runs alone)."""

from __future__ import annotations

import json
import logging
import os
import sys

from kdflow.logs import FAILED_EXIT, log_failure
from kdflow.train import TrainJob, run_training


def main(argv: list[str] | None = None) -> int:
    """``python -m kdflow.train JOB.json``: one process of a run (rank ``RANK`` of a launcher, or alone)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kdflow.train JOB.json   (a TrainJob written by the train rule)", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    try:
        summary = run_training(TrainJob.load(argv[0]))
    except Exception as e:  # one record, on every rank that fails: kdflow's message, or the traceback
        log_failure(logging.getLogger("kdflow.train"), e)
        return FAILED_EXIT
    if rank == "0":
        print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Logging for workflow jobs: everything to the rule's ``log:`` file and to stderr, and how a job ends on an
error (:mod:`kdflow.errors`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kdflow.errors import TRACEBACK_ENV, KdflowError, want_traceback

T = TypeVar("T")

FAILED_EXIT = 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def run_logged(log_file: str | Path, job: Callable[[], T]) -> T:
    """Run ``job`` with kdflow's loggers writing to ``log_file`` and stderr.

    A failure is logged once, to both, and the process exits with status 1, so that Snakemake marks the job
    failed and removes its outputs. One of kdflow's own errors (:class:`kdflow.errors.KdflowError`) is logged as
    its message alone, which says what is wrong, where, and what to do; any other exception with its traceback.
    ``KDFLOW_TRACEBACK=1`` adds the traceback to kdflow's errors too.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    log_file.write_text("", encoding="utf-8")  # a fresh log per attempt; appended to, so that the ranks of a
    # tensor-parallel job (kdflow.teacher_parallel) can add their lines to it as well (O_APPEND: no overwrites)
    handlers: list[logging.Handler] = [
        logging.FileHandler(log_file, mode="a", encoding="utf-8"),
        logging.StreamHandler(sys.stderr),
    ]
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    try:
        return job()
    except Exception as e:
        log_failure(logging.getLogger("kdflow"), e)
        raise SystemExit(FAILED_EXIT) from None
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()


def log_failure(log: logging.Logger, error: BaseException) -> None:
    """One log record for a failed job: kdflow's own error as its message, anything else with its traceback."""
    if isinstance(error, KdflowError) and not want_traceback():
        log.error("job failed: %s\n(set %s=1 for the traceback)", error, TRACEBACK_ENV)
    else:
        log.error("job failed: %s: %s", type(error).__name__, error, exc_info=error)

"""Logging for workflow jobs: everything to the rule's ``log:`` file and to stderr."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def run_logged(log_file: str | Path, job: Callable[[], T]) -> T:
    """Run ``job`` with kdflow's loggers writing to ``log_file`` and stderr.

    A failure is logged with its traceback (so the log file says why the job failed), then re-raised so
    that Snakemake marks the job failed and removes its outputs.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [
        logging.FileHandler(log_file, mode="w", encoding="utf-8"),
        logging.StreamHandler(sys.stderr),
    ]
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    try:
        return job()
    except Exception:
        logging.getLogger("kdflow").exception("job failed")
        raise
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()

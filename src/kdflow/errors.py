"""The base of kdflow's own errors, and how a job or command ends on one.

Every error kdflow raises on purpose (a bad config, a missing file, a model that does not match, a cache
from another study) derives from :class:`KdflowError`, whatever its other base (``ValueError``,
``RuntimeError``), and its message says what is wrong, which file or key, and what to do. A job that fails on
one ends with that message alone (:func:`kdflow.logs.run_logged`); a traceback is printed only for an
unexpected exception, or for every failure when ``KDFLOW_TRACEBACK=1`` is set.
"""

from __future__ import annotations

import os

TRACEBACK_ENV = "KDFLOW_TRACEBACK"


class KdflowError(Exception):
    """An error whose message is the whole story (no traceback needed to act on it)."""


def want_traceback() -> bool:
    """Whether the user asked for tracebacks of kdflow's own errors too (``KDFLOW_TRACEBACK=1``)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}

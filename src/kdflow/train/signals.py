"""SIGUSR1 and SIGTERM during training: noted by the handler, acted on at the end of the step in progress (a
checkpoint; SIGTERM then stops the run with exit status 143, SIGUSR1 continues: what SLURM sends before the time
limit with ``--signal=B:USR1@…``)."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("kdflow.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Interrupted(SystemExit):
    """SIGTERM arrived: a checkpoint was written and the run stops (rerun to resume)."""

    def __init__(self, step: int):
        super().__init__(128 + signal.SIGTERM)
        self.step = step


class StopSignals:
    """``with StopSignals() as s:`` handles :data:`STOP_SIGNALS` (``s.received``: the last one, or None), and gives
    the previous handlers back at the end. Off the main thread the handlers are left alone."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, _frame) -> None:
        self.received = signum
        log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        try:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: leave the handlers alone
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

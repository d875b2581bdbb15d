"""The learning-rate schedule: a factor of the peak ``optimizer.lr`` per optimiser step (torch's ``LambdaLR``).

Not transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` / ``get_linear_schedule_with_warmup`` /
``get_constant_schedule_with_warmup``: those warm up from 0 (``step / warmup``, ours ``(step + 1) / (warmup + 1)``)
and their linear decay has no floor, so with ``warmup_steps > 0`` or a linear schedule with ``min_lr_ratio > 0``
the rates differ (by up to 1 % of the peak during warm-up, 10 % at the end of a linear one); torch's chained
schedulers (``LinearLR``, ``CosineAnnealingLR`` in ``SequentialLR``) differ in the last bits (~1e-15 relative).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdflow.runs import Schedule


def lr_lambda(schedule: Schedule, total_steps: int) -> Callable[[int], float]:
    """``factor(step)`` after ``step`` optimiser steps: linear warm-up from 1/(warmup+1), then cosine or linear decay
    to ``min_lr_ratio`` at ``total_steps``, or constant."""
    warm, kind, floor = schedule.warmup_steps, schedule.kind, schedule.min_lr_ratio

    def factor(step: int) -> float:  # step = optimiser steps already taken
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warm)
        progress = min(1.0, (step - warm) / span)
        if kind == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor

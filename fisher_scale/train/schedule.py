"""The learning rate of each optimizer step: a linear warm-up, then constant, or a linear or cosine decay that
reaches zero one step after the last (``train.lr_schedule``; transformers' schedules after warm-up)."""

from __future__ import annotations

import math

from fisher_scale.config import LrSchedule


def learning_rate(step: int, *, peak: float, steps: int, warmup: int, schedule: LrSchedule) -> float:
    """The lr of 0-based ``step`` of ``steps``: ``peak·(step+1)/warmup`` while warming up, then ``schedule``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))

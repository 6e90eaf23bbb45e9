"""Learning-rate schedule: linear warm-up, then constant, linear or cosine decay.

A pure function of the global step, so a resumed run picks up the schedule where the lost one left
it (the optimizer's saved ``lr`` is never trusted: each step sets every group's rate afresh).

``step`` is the 0-based index of the optimizer step about to be taken. Warm-up ramps as
``(step + 1) / warmup`` so step 0 already moves the weights and step ``warmup - 1`` reaches the peak;
decay runs over ``progress = (step - warmup) / (total - warmup)`` in [0, 1), so the last step still
has a small positive rate (no step of the budget is spent at rate 0).
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, total: int, warmup: int = 0, kind: str = "constant") -> float:
    """The factor (0, 1] that scales each parameter group's configured rate at ``step``."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {kind!r}")
    if total < 1 or warmup < 0 or step < 0:
        raise ValueError(f"lr_multiplier: needs total >= 1, warmup >= 0, step >= 0 (got {step}, {total}, {warmup})")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))

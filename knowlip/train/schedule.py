"""Learning-rate and distillation-weight schedules: pure functions of the optimiser step (0-based)."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to base_lr over `warmup_steps` (the first step already trains, at base_lr / warmup), then
    cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def alpha_at(step: int, alpha: float, ramp_steps: int) -> float:
    """Momentum-distillation weight, ramped linearly from alpha / ramp_steps to alpha."""
    return alpha * min(1.0, (step + 1) / ramp_steps) if ramp_steps > 0 else alpha

"""Learning-rate and distillation-weight schedules: pure functions of the optimiser step (0-based)."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to base_lr over `warmup_steps` (the first step already trains, at base_lr / warmup), then
    cosine decay to min_lr at `total_steps` (BLIP's cosine_lr_schedule floors at its min_lr)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def alpha_at(step: int, alpha: float, ramp_steps: int) -> float:
    """Momentum-distillation weight, ramped linearly from exactly 0 at step 0 to alpha at `ramp_steps`, as BLIP's
    pretrain.py (alpha x min(1, i / (2 x steps per epoch)): two epochs)."""
    return alpha * min(1.0, step / ramp_steps) if ramp_steps > 0 else alpha

"""Test hooks: faults that cannot be produced from outside the process, injected on cue.

KNOWLIP_FAULT_<NAME>=a or a-b fires at these (1-based) steps:
- NAN_STEPS: the last rank sees a non-finite loss;
- NAN_GRADS: the last rank's loss stays finite but its gradients are not (`poison_gradients`);
- KILL_IN_SAVE: the last rank is killed (SIGKILL) with its checkpoint files half written;
- ENOSPC_IN_SAVE: rank 0's save fails with "No space left on device" (the other ranks wait in the save);
- SLOW_STEPS: each step sleeps 0.5 s (a window for outages, tests/test_mlflow.py).
"""

from __future__ import annotations

import os
import signal


def fault_at(name: str, step: int) -> bool:
    spec = os.environ.get(f"KNOWLIP_FAULT_{name.upper()}")
    if not spec:
        return False
    lo, _, hi = spec.partition("-")
    return int(lo) <= step <= int(hi or lo)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def poison_gradients(loss: "torch.Tensor") -> "torch.Tensor":
    """`loss` with the same value and a NaN gradient (0 x d sqrt(x)/dx at x = 0), so every parameter it depends
    on gets NaN gradients while the loss itself stays finite."""
    import torch

    return loss + (torch.sqrt(loss - loss.detach()) * 0).sum()

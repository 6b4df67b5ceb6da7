"""What the bench scripts share: a median timer (CUDA events on a GPU) and JSON-lines output."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


class JsonLines:
    """emit(row): one JSON line on stdout, and appended to `out` when set."""

    def __init__(self, out: Path | None = None):
        self.out = out

    def __call__(self, row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self.out is not None:
            with Path(self.out).open("a") as f:
                f.write(line + "\n")


class Timer:
    """Median milliseconds of fn(): CUDA events on a GPU, perf_counter otherwise."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats=20, warmup=3):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))

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
    """Median milliseconds of fn(): CUDA events on a GPU, perf_counter otherwise.

    `back_to_back` calls are enqueued between the two events and the time divided by their number: a single
    call's events also time the host's work before its launch (tens of microseconds of Python for a kernel
    wrapper), during which the GPU idles; back to back, the launches queue up behind the running kernel."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats=20, warmup=3, back_to_back=1):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(back_to_back):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / back_to_back)
            else:
                t = time.perf_counter()
                for _ in range(back_to_back):
                    fn()
                times.append((time.perf_counter() - t) * 1e3 / back_to_back)
        return float(np.median(times))

"""What a training run reports as it goes: throughput over the logging window, the rows of metrics.jsonl
(rank 0 only), the progress bar, and the rule that a resumed run continues the same metrics file."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch


class Throughput:
    """Throughput over the window since the last log line: samples/s, TFLOP/s, MFU, data-wait share."""

    def __init__(self, flops_per_sample: int, peak: float | None, world_size: int):
        self.flops_per_sample, self.peak, self.world_size = flops_per_sample, peak, world_size
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.data_time, self._fetch = time.perf_counter(), 0, 0.0, time.perf_counter()

    def fetch_started(self) -> None:
        self._fetch = time.perf_counter()

    def fetched(self, samples: int) -> None:
        self.data_time += time.perf_counter() - self._fetch
        self.samples += samples * self.world_size

    def window(self) -> dict:
        """samples/s and TFLOP/s of the whole job; MFU per device."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        flops = self.flops_per_sample * self.samples / elapsed
        out = {"samples_per_s": round(self.samples / elapsed, 2), "tflops_per_s": round(flops / 1e12, 4),
               "mfu": round(flops / self.world_size / self.peak, 4) if self.peak else None,
               "data_time_share": round(self.data_time / elapsed, 3)}
        self._reset()
        return out


def memory_use(device: torch.device) -> dict:
    """Peak GPU memory, or the host's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return {"max_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3), "mem_kind": "gpu_peak"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"max_mem_gib": round(rss, 3), "mem_kind": "host_rss"}


METRICS_FILE = "metrics.jsonl"
SCIO_SAMPLES_FILE = "scio_samples.jsonl"


def history_files(run_dir: Path) -> list[Path]:
    """A run's own record of its steps (beside the checkpoints): what resume=none must not mix with."""
    return [Path(run_dir) / METRICS_FILE, Path(run_dir) / SCIO_SAMPLES_FILE]


def truncate_metrics(path: Path, step: int, keep_dropped_in: Path | None = None) -> None:
    """A resumed run continues the same metrics.jsonl: rows past the checkpoint's step (logged before a crash
    and about to be redone, or of a branch the run left) are dropped, or kept in `keep_dropped_in`."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines()
    keep = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(keep) != len(rows):
        if keep_dropped_in is not None:
            dropped = [r for r in rows if r.strip() and json.loads(r).get("step", 0) > step]
            (keep_dropped_in / path.name).write_text("".join(r + "\n" for r in dropped))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in keep))
        tmp.replace(path)


class MetricsFile:
    """metrics.jsonl, appended to by rank 0 only."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active, self.file = path, active, None

    def __enter__(self):
        if self.active:
            self.file = self.path.open("a")
        return self

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def step_line(row: dict, steps: int, global_batch: int) -> str:
    """The plain line a log gets every train.log_every steps (where no progress bar is drawn)."""
    def fmt(key: str, spec: str = ".4f") -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    rate = row.get("samples_per_s") or 0.0
    eta = (steps - row["step"]) * global_batch / rate if rate else None
    mfu = f" MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
    return (f"step {row['step']}/{steps} loss {fmt('loss')} (itc {fmt('loss_itc')} itm {fmt('loss_itm')} recon "
            f"{fmt('loss_recon')}) lr {fmt('lr', '.2e')} grad_norm {fmt('grad_norm', '.3g')} | {rate:.1f} samples/s"
            f"{mfu} data-wait {row.get('data_time_share', 0.0):.0%} | ETA "
            f"{time.strftime('%H:%M:%S', time.gmtime(eta)) if eta is not None else '-'}")


class ProgressBar:
    """A progress bar on rank 0 when stderr is a terminal (step, loss, samples/s and ETA); in a log file its
    redraws would pile up, so there the trainer logs a plain line every train.log_every steps instead."""

    def __init__(self, total: int, initial: int, wanted: bool):
        from tqdm import tqdm

        self.active = wanted and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not self.active, unit="step", file=sys.stderr,
                        mininterval=1.0, dynamic_ncols=True, desc="train")
        self.last = time.perf_counter()

    def update(self, values: dict, samples: int) -> None:
        now = time.perf_counter()
        rate, self.last = samples / max(now - self.last, 1e-9), now
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", samples_per_s=f"{rate:.1f}", refresh=False)
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

"""One training step through the engine: samples/s, TFLOP/s, MFU, and where the step's time goes.

    .venv/bin/python bench/train_step.py                  # CPU: tiny, ZeRO-3 (1 rank) vs the plain engine
    python bench/train_step.py --gpu                      # GPU: base at 224 px and 512 px, bf16, ZeRO-3, 1 rank

Random inputs of the real shapes (no loader: this measures the step). Each case runs warm-up steps, then
times --steps steps and reports the median. `optimizer_share` is the share of step time in the engine's
optimiser step (ZeRO-3: gradient partition bookkeeping, AdamW, re-partitioning); `zero_gather_share` the share
spent in ZeRO-3's parameter fetches (PartitionedParameterCoordinator.fetch_sub_module: all-gathers and their
waits). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knowlip.config import load_config  # noqa: E402
from knowlip.launch.local import RankEnv, free_port  # noqa: E402
from knowlip.model.dims import preset  # noqa: E402
from knowlip.model.flops import training_flops_per_sample  # noqa: E402
from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens  # noqa: E402
from knowlip.train.engine import build_engine, init_process_group  # noqa: E402
from knowlip.train.trainer import peak_flops  # noqa: E402

VOCAB = {"tiny": 4096, "base": 30524}  # tiny: as bench/model_step.py; base: bert-base + [ENC] [DEC]


class _Timer:
    """Wall time inside a wrapped callable, synchronising the GPU around it."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.total += time.perf_counter() - start
        return timed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _gather_timer(device: torch.device) -> _Timer:
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    timer = _Timer(device)
    cls = ppc.PartitionedParameterCoordinator
    if not hasattr(cls, "_knowlip_original_fetch"):
        cls._knowlip_original_fetch = cls.fetch_sub_module
    cls.fetch_sub_module = timer.wrap(cls._knowlip_original_fetch)
    return timer


def run_case(engine_name: str, size: str, image_size: int, batch: int, text_len: int, steps: int,
             device: torch.device, bf16: bool) -> dict:
    cfg = load_config(None, [f"train.engine={engine_name}", f"model.size={size}", f"model.image_size={image_size}",
                             f"data.batch_size={batch}", f"data.max_text_len={text_len}", "train.grad_clip=1.0"])
    torch.manual_seed(0)
    dims = preset(size, image_size=image_size)
    vocab = VOCAB[size]
    model = SarKnowLIP(dims, vocab, SpecialTokens(0, 2, 3, 4, 5, 6), attention_backend="auto")
    engine = build_engine(model, cfg, device, bf16, accumulation=1)
    gathers = _gather_timer(device) if engine_name == "deepspeed" else _Timer(device)
    optimizer = _Timer(device)
    step_fn = optimizer.wrap(engine.step)
    dtype = torch.bfloat16 if bf16 else torch.float32
    images = torch.rand(batch, 1, image_size, image_size, device=device, dtype=dtype)
    ids = torch.randint(7, vocab, (batch, text_len), device=device)
    ids[:, 0] = 2
    att = torch.ones(batch, text_len, dtype=torch.long, device=device)
    kw = torch.rand(batch, text_len, device=device) < 0.3
    times, warmup = [], 3
    for i in range(steps + warmup):
        if i == warmup:
            gathers.total = optimizer.total = 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.momentum_update()
        out = engine.forward(images, ids, att, kw, alpha=0.4)
        engine.backward(out["loss"])
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    flops = training_flops_per_sample(dims, vocab, image_size, text_len, 1, batch, dims.queue_size)
    peak = peak_flops(device)
    return {"bench": "train_step", "engine": engine_name, "preset": size, "image_size": image_size,
            "batch_size": batch, "text_len": text_len, "precision": "bf16" if bf16 else "fp32",
            "median_step_s": round(median, 4), "samples_per_s": round(batch / median, 1),
            "tflops_per_s": round(flops * batch / median / 1e12, 4),
            "mfu": round(flops * batch / median / peak, 4) if peak else None,
            "optimizer_share": round(optimizer.total / sum(times), 3),
            "zero_gather_share": round(gathers.total / sum(times), 3) if engine_name == "deepspeed" else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true", help="base at 224 and 512 px in bf16 on the GPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU cases)")
    parser.add_argument("--batch-224", type=int, default=64)
    parser.add_argument("--batch-512", type=int, default=16)
    args = parser.parse_args()
    gpu = args.gpu and torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if not gpu:
        torch.set_num_threads(args.threads)
    init_process_group(RankEnv(0, 1, 0, 1, "127.0.0.1", free_port()), device, "auto", 600)
    if gpu:
        cases = [("deepspeed", "base", 224, args.batch_224), ("deepspeed", "base", 512, args.batch_512)]
    else:
        cases = [("plain", "tiny", 64, 16), ("deepspeed", "tiny", 64, 16)]
    results = []
    for engine_name, size, image_size, batch in cases:
        results.append(run_case(engine_name, size, image_size, batch, 128, args.steps, device, bf16=gpu))
        print(json.dumps(results[-1]), flush=True)
    if not gpu:
        plain, zero = results
        print(json.dumps({"bench": "zero3_overhead", "preset": "tiny",
                          "step_time_ratio": round(zero["median_step_s"] / plain["median_step_s"], 2)}))


if __name__ == "__main__":
    main()

"""Training-step time and FLOPs of the model: the tiny preset on this machine, FLOP counts for all presets.

    .venv/bin/python bench/model_step.py [--threads 1] [--batch-size 16] [--text-len 128] [--steps 10]
Prints JSON lines: per-step time for `tiny` (forward + backward + AdamW + momentum update, random data) and the
analytic FLOPs per sample of each preset (the MFU meter's numbers).
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
from knowlip.model.dims import PRESETS, preset  # noqa: E402
from knowlip.model.flops import inference_flops_per_image, training_flops_per_sample  # noqa: E402
from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens  # noqa: E402

VOCAB = 30524


def tiny_step_time(args) -> dict:
    torch.manual_seed(0)
    dims = preset("tiny")
    model = SarKnowLIP(dims, args.vocab, SpecialTokens(0, 2, 3, 4, 5, 6), attention_backend="sdpa")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b, length, size = args.batch_size, args.text_len, dims.vision.image_size
    images = torch.rand(b, 1, size, size)
    ids = torch.randint(7, args.vocab, (b, length))
    ids[:, 0] = 2
    att = torch.ones(b, length, dtype=torch.long)
    kw = torch.rand(b, length) < 0.3
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        model.momentum_update()
        loss = model(images, ids, att, kw)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # skip warm-up
            times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    flops = training_flops_per_sample(dims, args.vocab, size, length, 1, b)
    return {"bench": "tiny_train_step", "batch_size": b, "text_len": length, "image_size": size,
            "threads": torch.get_num_threads(), "median_step_s": round(step, 4),
            "samples_per_s": round(b / step, 1), "gflop_per_s": round(flops * b / step / 1e9, 2),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(tiny_step_time(args)))
    for name in PRESETS:
        for image_size in (224, 512) if name != "tiny" else (64,):
            dims = preset(name, image_size=image_size)
            per_sample = training_flops_per_sample(dims, VOCAB, image_size, 128, 1, global_batch=512)
            print(json.dumps({"bench": "flops", "preset": name, "image_size": image_size, "text_len": 128,
                              "train_gflop_per_sample": round(per_sample / 1e9, 2),
                              "vit_forward_gflop": round(inference_flops_per_image(dims, image_size) / 1e9, 2)}))


if __name__ == "__main__":
    main()

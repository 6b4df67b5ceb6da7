"""Probes of ZeRO-3 levers (issue 26): what each does to a step's Python calls and to its losses, measured on a
fresh model, to size a change before it is built (and to check it after).

    .venv/bin/python bench/zero3_probes.py                 # tiny, one rank, CPU
    .venv/bin/python bench/zero3_probes.py --size base --image-size 224 --batch 2

Probes (each in its own engine, ZeRO-3, one rank):
- `block`: a block at a time, one parameter per weight (train.zero3_gather=block).
- `flat`: train.zero3_gather=flat, each block's weights in a few flat parameters (knowlip.train.param_layout,
  as FSDP lays them out; the default). Its losses are compared with `block`'s. The GPU step plan times it too (`zero3_flat`).
- `vision_leaf`: the whole image encoder as one DeepSpeed leaf module. Expected to fail: a leaf reduces its
  gradients from a backward hook on an input that requires grad (DeepSpeed PR #5074), and the encoder's only
  input, the images, does not; the error is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402


def run(probe: str, args) -> dict:
    build_engine = train_step.build_engine

    def vision_leaf(model, *a, **k):
        from deepspeed.utils import set_z3_leaf_module

        set_z3_leaf_module(model.vision, True)
        return build_engine(model, *a, **k)

    train_step.build_engine = vision_leaf if probe == "vision_leaf" else build_engine
    overrides = ("train.zero3_gather=flat",) if probe == "flat" else ("train.zero3_gather=block",)
    try:
        engine, _, vocab = train_step.build("deepspeed", args.size, args.image_size, args.batch, args.text_len,
                                            torch.device("cpu"), False, overrides=overrides)
    finally:
        train_step.build_engine = build_engine
    inputs = train_step.random_batch(args.batch, args.image_size, args.text_len, vocab, torch.device("cpu"),
                                     torch.float32, True)
    losses = []
    for _ in range(3):
        engine.momentum_update()
        out = engine.forward(*inputs, alpha=0.4)
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].item())
    phases = train_step.calls_by_phase(engine, inputs, torch.device("cpu"))
    return {"probe": probe, "params": sum(1 for _ in engine.module.parameters()), "losses": losses,
            "calls": sum(phases.values()), "phases": phases}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--probes", default="block,flat,vision_leaf")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_step.init_process_group(train_step.RankEnv(0, 1, 0, 1, "127.0.0.1", train_step.free_port()),
                                  torch.device("cpu"), "auto", 600)
    results = {}
    for probe in args.probes.split(","):
        try:
            results[probe] = run(probe, args)
        except RuntimeError as err:
            print(json.dumps({"probe": probe, "failed": str(err).splitlines()[0]}))
            continue
        print(json.dumps(results[probe]))
    if "block" in results and "flat" in results:
        block, flat = results["block"], results["flat"]
        drift = max(abs(a - b) for a, b in zip(block["losses"], flat["losses"]))
        print(json.dumps({"probe": "flat_vs_block", "calls_ratio": round(flat["calls"] / block["calls"], 3),
                          "largest_loss_difference": drift}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Probes of ZeRO-3 levers that are not in knowlip (issue 26): what each would do to a step's Python calls, measured
on a throwaway copy of the model, to size the next change before it is built.

    .venv/bin/python bench/zero3_probes.py                 # tiny, one rank, CPU
    .venv/bin/python bench/zero3_probes.py --size base --image-size 224 --batch 2

Probes (each in its own engine, all at train.zero3_gather=block, ZeRO-3, one rank):
- `now`: knowlip's ZeRO-3 step as it is.
- `flat`: one flat parameter per ViT block and text layer (and per decay class, and cross-attention apart so
  that the momentum copies, which have none, still pair by name), the layers' weights bound as views of it at
  each call, as FSDP does. Not in knowlip: it renames every parameter of a checkpoint, an export and the
  pretrained-weight maps. Its losses are compared with `now`'s.
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
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402
from knowlip.model.text import TextLayer  # noqa: E402
from knowlip.model.vit import VitBlock  # noqa: E402

FUSION = ("cross_attn", "dec_self_attn")  # what a momentum text layer does not have


def flatten_parameters(unit: nn.Module) -> None:
    """Replace `unit`'s parameters with one flat parameter per group, bound back as views before each call."""
    groups: dict[str, list[tuple[nn.Module, str, torch.Tensor]]] = {}
    for path, sub in unit.named_modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            key = ("fusion_" if path.split(".")[0] in FUSION else "") + ("no_decay" if p.dim() < 2 else "decay")
            groups.setdefault(key, []).append((sub, name, p))
    views = []
    for key, members in groups.items():
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for _, _, p in members]),
                            requires_grad=members[0][2].requires_grad)
        unit.register_parameter(f"flat_{key}", flat)
        offset = 0
        for sub, name, p in members:
            del sub._parameters[name]
            views.append((f"flat_{key}", sub, name, offset, p.shape))
            offset += p.numel()

    def bind(*_):
        for flat_name, sub, name, offset, shape in views:
            size = shape.numel()
            sub.__dict__[name] = getattr(unit, flat_name)[offset : offset + size].view(shape)

    bind()
    unit.forward = _bound(unit.forward, bind)  # after DeepSpeed's pre-forward hook has gathered the flat weights


def _bound(forward, bind):
    def call(*args, **kwargs):
        bind()
        return forward(*args, **kwargs)
    return call


def run(probe: str, args) -> dict:
    build_engine = train_step.build_engine

    def patched(model, *a, **k):
        if probe == "flat":
            for unit in [m for m in model.modules() if isinstance(m, (VitBlock, TextLayer))]:
                flatten_parameters(unit)
        if probe == "vision_leaf":
            from deepspeed.utils import set_z3_leaf_module
            set_z3_leaf_module(model.vision, True)
        return build_engine(model, *a, **k)

    train_step.build_engine = patched
    try:
        engine, _, vocab = train_step.build("deepspeed", args.size, args.image_size, args.batch, args.text_len,
                                            torch.device("cpu"), False)
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
    parser.add_argument("--probes", default="now,flat,vision_leaf")
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
    if "now" in results and "flat" in results:
        now, flat = results["now"], results["flat"]
        drift = max(abs(a - b) for a, b in zip(now["losses"], flat["losses"]))
        print(json.dumps({"probe": "flat_vs_now", "calls_ratio": round(flat["calls"] / now["calls"], 3),
                          "largest_loss_difference": drift}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

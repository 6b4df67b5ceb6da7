"""A probe's parameter layout, not knowlip's (bench/zero3_probes.py, the `zero3_flat` case of the GPU step plan):
one flat parameter per transformer block and decay class, as FSDP lays them out, so that ZeRO-3's per-parameter
work (gather, release, reduction, the optimiser step) runs over a few large tensors instead of many small ones.
Cross-attention and decoder attention get their own, so that a momentum copy (which has neither) still pairs
with its online block by name."""

from __future__ import annotations

import torch
import torch.nn as nn

from knowlip.model.text import TextLayer
from knowlip.model.vit import VitBlock

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
        flat = torch.cat([p.detach().reshape(-1) for _, _, p in members])
        if not key.endswith("no_decay"):
            flat = flat[None]  # 2-D, so that the trainer's optimiser groups (by dimension) decay it
        flat = nn.Parameter(flat, requires_grad=members[0][2].requires_grad)
        unit.register_parameter(f"flat_{key}", flat)
        offset = 0
        for sub, name, p in members:
            del sub._parameters[name]
            views.append((f"flat_{key}", sub, name, offset, p.shape))
            offset += p.numel()

    def bind(*_):
        for flat_name, sub, name, offset, shape in views:
            size = shape.numel()
            sub.__dict__[name] = getattr(unit, flat_name).view(-1)[offset : offset + size].view(shape)

    bind()
    unit.forward = _bound(unit.forward, bind)  # after DeepSpeed's pre-forward hook has gathered the flat weights


def _bound(forward, bind):
    def call(*args, **kwargs):
        bind()
        return forward(*args, **kwargs)
    return call


def flatten_blocks(model: nn.Module) -> None:
    """Every ViT block and text layer of `model` (online and momentum) to flat parameters."""
    for unit in [m for m in model.modules() if isinstance(m, (VitBlock, TextLayer))]:
        flatten_parameters(unit)

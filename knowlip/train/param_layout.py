"""ZeRO-3's parameter layout. `train.zero3_gather=flat` keeps each transformer block's weights in a few flat
parameters, as FSDP lays them out, instead of one parameter per weight and bias: DeepSpeed's ZeRO-3 does
per-parameter work every step (gathering, releasing, reducing, and an optimiser step that frees every weight and
gathers the small ones again), so on `base` 950 parameters become 158 and a step's Python calls fall to 0.37x
(BENCHMARKS.md). The maths is unchanged: each weight is a view of its flat parameter, bound at every call.

A block's flat parameters: `flat_decay` (its weight matrices) and `flat_no_decay` (biases and norms), and the
same two prefixed `fusion_` for cross-attention and the decoder's self-attention, which a momentum text layer
lacks, so an online block and its momentum copy still pair by name. The decayed ones are 1 x N: the optimiser's
groups (engine.param_groups) decay parameters of two or more dimensions, and a block holds no other exception.

Only DeepSpeed's own checkpoint files carry these names. knowlip's files (momentum.pt, exports) keep the
original ones: `unflatten` and `flatten` map between the two."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

FUSION = ("cross_attn", "dec_self_attn")  # the parts of a text layer its momentum copy does not have
FLAT_LAYOUT, PER_PARAMETER = "flat", "per_parameter"  # the layouts a checkpoint's meta.json names


@dataclass(frozen=True)
class FlatParam:
    name: str  # its name in the model, e.g. "vision.blocks.0.flat_decay"
    members: tuple[tuple[str, tuple[int, ...]], ...]  # (original name, shape), in storage order
    decayed: bool

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.members)

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.numel) if self.decayed else (self.numel,)

    def slices(self):
        """(original name, shape, offset) of each member."""
        offset = 0
        for name, shape in self.members:
            yield name, shape, offset
            offset += math.prod(shape)


def _bind(target) -> None:
    unit, flat_attr, members = target
    data = getattr(unit, flat_attr).view(-1)
    for owner, attr, offset, size, shape in members:
        owner.__dict__[attr] = data[offset : offset + size].view(shape)  # a plain attribute: no longer a parameter


def flat_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose weights go flat: every ViT block and text layer, online and momentum."""
    from knowlip.model.text import TextLayer
    from knowlip.model.vit import VitBlock

    return [(name, module) for name, module in model.named_modules() if isinstance(module, (VitBlock, TextLayer))]


class FlatLayout:
    """Where every block's weights live in its flat parameters; planned from an unflattened model."""

    def __init__(self, flats: list[FlatParam]):
        self.flats = flats

    @classmethod
    def of(cls, model: nn.Module) -> "FlatLayout":
        flats = []
        for unit_name, unit in flat_units(model):
            groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
            for name, p in unit.named_parameters():
                key = ("fusion_" if name.split(".")[0] in FUSION else "") + ("decay" if p.dim() >= 2 else "no_decay")
                groups.setdefault(key, []).append((f"{unit_name}.{name}", tuple(p.shape)))
            flats += [FlatParam(f"{unit_name}.flat_{key}", tuple(members), not key.endswith("no_decay"))
                      for key, members in groups.items()]
        return cls(flats)

    # -- the model ---------------------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> None:
        """Replace the blocks' parameters with the flat ones (values copied, requires_grad kept)."""
        for flat in self.flats:
            unit_name, flat_attr = flat.name.rsplit(".", 1)
            unit = model.get_submodule(unit_name)
            members = [model.get_parameter(name) for name, _ in flat.members]
            values = torch.cat([p.detach().reshape(-1) for p in members]).reshape(flat.shape)
            unit.register_parameter(flat_attr, nn.Parameter(values, requires_grad=members[0].requires_grad))
            for name, _ in flat.members:
                owner, attr = name.rsplit(".", 1)
                del model.get_submodule(owner)._parameters[attr]
        self.bind(model)  # views that autograd tracks back to the flat parameters

    def bind(self, model: nn.Module) -> None:
        """Point every member at its view of the flat parameter as it is now (ZeRO-3 swaps in the gathered data
        before each call, so this runs again then: `bind_before_each_call`)."""
        for flat in self.flats:
            _bind(self._target(model, flat))

    def bind_before_each_call(self, model: nn.Module) -> None:
        """A forward pre-hook on every block that re-binds its views. Register it after deepspeed.initialize: hooks
        run in the order they were registered, and DeepSpeed's gathers the flat parameters first."""
        by_unit: dict[str, list] = {}
        for flat in self.flats:
            by_unit.setdefault(flat.name.rsplit(".", 1)[0], []).append(self._target(model, flat))
        for unit_name, targets in by_unit.items():
            def rebind(_module, _args, targets=targets):
                for target in targets:
                    _bind(target)
            model.get_submodule(unit_name).register_forward_pre_hook(rebind)

    @staticmethod
    def _target(model: nn.Module, flat: FlatParam):
        """(block, flat attribute, [(member's owner, attribute, offset, size, shape)]): resolved once."""
        unit_name, flat_attr = flat.name.rsplit(".", 1)
        members = []
        for name, shape, offset in flat.slices():
            owner, attr = name.rsplit(".", 1)
            members.append((model.get_submodule(owner), attr, offset, math.prod(shape), shape))
        return model.get_submodule(unit_name), flat_attr, members

    # -- state dicts --------------------------------------------------------------------------------------------

    def unflatten(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flat entries of `state` split into their members (copies: an export may not share storage); other
        entries as they are."""
        out = dict(state)
        for flat in self.flats:
            if flat.name not in out:
                continue
            data = out.pop(flat.name).reshape(-1)
            if data.numel() != flat.numel:
                raise ValueError(f"{flat.name}: {data.numel()} values, but its members hold {flat.numel}")
            for name, shape, offset in flat.slices():
                out[name] = data[offset : offset + math.prod(shape)].view(shape).clone()
        return out

    def flatten(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `unflatten` for the flat parameters whose members `state` holds."""
        out = dict(state)
        for flat in self.flats:
            names = [name for name, _ in flat.members]
            present = [name in out for name in names]
            if not any(present):
                continue
            if not all(present):
                missing = names[present.index(False)]
                raise ValueError(f"{missing} is missing: {flat.name} needs every member")
            out[flat.name] = torch.cat([out.pop(name).reshape(-1) for name in names]).reshape(flat.shape)
        return out

"""Memory per device of a training step, and the ZeRO stage `train.zero_stage=auto` takes from it.

Model states per GPU, n ranks (mixed precision, Adam): bf16 weights 2P (+ 2Q for the frozen momentum copies),
bf16 gradients 2P, fp32 masters + Adam moments 12P. ZeRO-1 partitions the 12P, ZeRO-2 the gradients too, ZeRO-3
everything. Activations come on top: an estimate proportional to tokens x width x depth of the passes that keep
activations for backward (the ViT once; the text model five times: ITC, ITM's three rows, the decoder), calibrated
on the one measurement (`base`, 224 px, 128 tokens, batch 128, bf16, one H100: 61.5 GiB, BENCHMARKS.md).

auto takes the lowest stage whose states + activations fit 90% of the device's memory less 1 GiB (the CUDA
context, fragmentation): the lower the stage, the less it gathers (ZeRO-3 fetches every module's weights for
every call). On a CPU it takes ZeRO-3, the design's engine, whatever the memory: the quickstart and CI keep
exercising it. A run that resumes keeps the stage its checkpoint was saved at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
TEXT_PASSES_WITH_GRAD = 5
MEASURED_ACTIVATION_GIB = 61.5  # base, 224 px, 128 tokens, batch 128, bf16
USABLE_SHARE, RESERVED_BYTES = 0.9, 1 * GIB


@dataclass(frozen=True)
class ZeroChoice:
    stage: int
    reason: str
    fits: bool = True  # False: not even ZeRO-3 fits by the estimate
    gather: str | None = None  # train.zero3_gather the choice needs ("module"), None: as configured or auto


def state_bytes(stage: int, trainable: int, frozen: int, ranks: int, block_gather: bool = False) -> float:
    """Model states per GPU at `stage` (1, 2 or 3) over `ranks` data-parallel ranks. ZeRO-3 with block gathering
    (train.zero3_gather=block), an upper bound: whole bf16 gradients until its one reduction pass (2P), the
    gathered weights torch's linear keeps for backward (2P) and a momentum tower gathered whole for its call
    (2Q; the towers run one after the other)."""
    p, q = trainable, frozen
    if stage == 1:
        return 2 * p + 2 * q + 2 * p + 12 * p / ranks
    if stage == 2:
        return 2 * p + 2 * q + 2 * p / ranks + 12 * p / ranks
    return (2 * p + 2 * q + 2 * p + 12 * p) / ranks + (4 * p + 2 * q if block_gather else 0)


def _activation_units(dims, image_size: int, text_len: int) -> int:
    v, t = dims.vision, dims.text
    vision_tokens = (image_size // v.patch) ** 2 + 1
    return vision_tokens * v.dim * v.depth + TEXT_PASSES_WITH_GRAD * text_len * t.dim * t.layers


def _base_units() -> int:
    from knowlip.model.dims import preset

    return _activation_units(preset("base"), 224, 128)


def activation_bytes(dims, image_size: int, text_len: int, micro_batch: int, bf16: bool = True,
                     checkpointing: bool = False) -> float:
    """The estimate for one rank's micro-batch (float32 doubles it; activation checkpointing keeps a block's
    input per layer and one layer's activations at a time, taken here as 1/depth + 5% of the full amount)."""
    per_unit = MEASURED_ACTIVATION_GIB * GIB / (128 * _base_units())
    total = _activation_units(dims, image_size, text_len) * micro_batch * per_unit * (1 if bf16 else 2)
    if checkpointing:
        total *= 1 / max(dims.vision.depth, dims.text.layers) + 0.05
    return total


def choose_zero_stage(trainable: int, frozen: int, activations: float, device_bytes: float, ranks: int,
                      block_gather: bool = False) -> ZeroChoice:
    """The lowest stage whose states + activations fit; ZeRO-3 (fits=False) when none does. At ZeRO-3, gathering
    a block at a time (`block_gather`, faster) when that fits, else a module at a time (gather="module": block
    gathering holds whole gradients, so where ZeRO-2 does not fit it rarely does)."""
    budget = USABLE_SHARE * device_bytes - RESERVED_BYTES
    gib = lambda b: f"{b / GIB:.1f} GiB"
    options = [(1, False), (2, False), (3, block_gather)] + ([(3, False)] if block_gather else [])
    for stage, blocks in options:
        states = state_bytes(stage, trainable, frozen, ranks, blocks)
        if states + activations <= budget:
            lower = ", the lower stages' do not" if stage > 1 else ""
            gather = "module" if block_gather and stage == 3 and not blocks else None
            how = (" gathering a module at a time (train.zero3_gather=module: a block at a time does not fit)"
                   if gather else "")
            return ZeroChoice(stage, f"model states {gib(states)} + activations ~{gib(activations)} fit "
                                     f"{gib(budget)} usable of {gib(device_bytes)} per GPU at ZeRO-{stage}{how}{lower} "
                                     f"({ranks} rank(s))", gather=gather)
    states = state_bytes(3, trainable, frozen, ranks, False)
    return ZeroChoice(3, f"model states {gib(states)} + activations ~{gib(activations)} exceed {gib(budget)} usable "
                         f"of {gib(device_bytes)} per GPU even at ZeRO-3 gathering a module at a time: lower "
                         "data.batch_size or set train.activation_checkpointing=true", fits=False,
                      gather="module" if block_gather else None)


def zero_stage_for(cfg, model, device, world_size: int) -> ZeroChoice:
    """train.zero_stage resolved for this job: as set; else a resumed run's saved stage; else the estimate."""
    if cfg.train.zero_stage != "auto":
        return ZeroChoice(int(cfg.train.zero_stage), "set by train.zero_stage")
    saved = _saved_stage(cfg)
    if saved is not None:
        return ZeroChoice(saved[0], f"the stage {saved[1]} was saved at (a run keeps its stage)")
    if device.type != "cuda":
        return ZeroChoice(3, "no GPU: ZeRO-3, the design's engine (memory does not limit a CPU run)")
    import torch

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    bf16 = cfg.train.precision != "fp32"
    activations = activation_bytes(model.dims, cfg.model.image_size, cfg.data.max_text_len, cfg.data.batch_size,
                                   bf16, cfg.train.activation_checkpointing)
    return choose_zero_stage(trainable, frozen, activations, torch.cuda.get_device_properties(device).total_memory,
                             world_size, cfg.train.zero3_gather != "module")


def zero3_gather_for(cfg, accumulation: int) -> tuple[str, str]:
    """(train.zero3_gather, why) for a ZeRO-3 job: as set; else (auto) a block at a time in flat parameters,
    unless gradient accumulation needs a module at a time or the run resumes a checkpoint saved with one
    parameter per weight (a run keeps its layout: DeepSpeed's files hold one)."""
    from knowlip.train.param_layout import FLAT_LAYOUT

    if cfg.train.zero3_gather != "auto":
        return cfg.train.zero3_gather, "set by train.zero3_gather"
    if accumulation > 1:
        return fresh_zero3_gather(accumulation), f"{accumulation} micro-batches a step: a module at a time"
    saved = _saved_meta(cfg)
    if saved is not None and saved[0].get("engine") == "deepspeed" and saved[0].get("param_layout") != FLAT_LAYOUT:
        return "block", f"{saved[1]} was saved with one parameter per weight (a run keeps its layout)"
    return fresh_zero3_gather(accumulation), "a block at a time, each block's weights in flat parameters"


def fresh_zero3_gather(accumulation: int) -> str:
    """What train.zero3_gather=auto takes with no checkpoint to follow: flat, which needs one micro-batch a step."""
    return "flat" if accumulation == 1 else "module"


def _saved_stage(cfg) -> tuple[int, str] | None:
    """(stage, checkpoint name) of what this job would resume, if it is a DeepSpeed checkpoint."""
    from knowlip.train.checkpoint import zero_stage_of

    saved = _saved_meta(cfg)
    stage = zero_stage_of(saved[0]) if saved else None
    return (stage, saved[1]) if stage is not None else None


def _saved_meta(cfg) -> tuple[dict, str] | None:
    """(meta.json, checkpoint name) of what this job would resume, if anything."""
    from knowlip.train.checkpoint import read_meta, resume_path

    try:
        path = resume_path(cfg)
    except (ValueError, FileNotFoundError):  # a bad resume path: the resume's own checks say so later
        return None
    return (read_meta(Path(path)), Path(path).name) if path is not None else None

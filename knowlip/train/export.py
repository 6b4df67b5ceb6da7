"""Export a checkpoint to consolidated safetensors + config + tokenizer, and load such an export with plain
torch (no DeepSpeed):

    from knowlip.train.export import load_exported
    model, tokenizer = load_exported("exported/")
    image_embeds, image_feat = model.encode_image(images)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from knowlip.choices import EXPORT_DTYPES
from knowlip.train import checkpoint as ckpt

WEIGHTS = "model.safetensors"
DTYPES = dict(zip(EXPORT_DTYPES, (torch.float32, torch.bfloat16), strict=True))


def consolidated_state_dict(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The full model state dict of a complete checkpoint, fp32: trainable weights from the engine's files,
    momentum weights and buffers from knowlip's own (the same tensors whatever the engine or world size)."""
    if verify:  # DeepSpeed's reader unpickles its files
        ckpt.verify_checkpoint(path)
    meta = ckpt.read_meta(path)
    if meta["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # it prints a lot
            weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=ckpt.ENGINE_TAG)
    else:
        state = ckpt.load_data(ckpt.plain_engine_file(path))
        weights = {**state["module"], **state.get("masters", {})}  # bf16 weights: their float32 masters
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    components, momentum = ckpt.load_global_state(path)
    weights.update(momentum)
    weights.update(components["buffers"])
    return weights


def export_checkpoint(source: str | Path, out: str | Path, dtype: str = "fp32", verify: bool = True) -> Path:
    """A checkpoint (or a run folder: its newest complete checkpoint) -> out/{model.safetensors, config.yaml,
    tokenizer/, export.json}. `verify=False` only for a checkpoint this process has just saved."""
    from safetensors.torch import save_file

    path, out = ckpt.resolve_checkpoint(source), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    weights = consolidated_state_dict(path, verify)
    cast = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(cast, str(tmp), metadata={"source": str(path), "dtype": dtype})
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors writes 0600; the export follows the umask like every other output
    tmp.replace(out / WEIGHTS)
    ckpt.copy_for_export(path, out)
    meta = ckpt.read_meta(path)
    (out / "export.json").write_text(json.dumps({"checkpoint": str(path), "step": meta["step"], "dtype": dtype,
                                                 "tensors": len(cast)}, indent=1))
    return out / WEIGHTS


def load_model(source: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config) from an export folder, a checkpoint or a run folder."""
    from knowlip.config import load_config

    source = Path(source)
    if (source / WEIGHTS).is_file() and (source / ckpt.CONFIG).is_file() and not (source / ckpt.CHECKPOINTS_DIR).is_dir():
        model, tokenizer = load_exported(source, device)
        return model, tokenizer, load_config(source / ckpt.CONFIG)
    path = ckpt.resolve_checkpoint(source)
    model, tokenizer = _build(path)
    model.load_state_dict(consolidated_state_dict(path))
    return model.to(device).eval(), tokenizer, load_config(path / ckpt.CONFIG)


def _build(folder: Path):
    from knowlip.config import load_config
    from knowlip.model.build import build_model
    from knowlip.text.tokenizer import load_tokenizer

    cfg = load_config(folder / ckpt.CONFIG, ["model.pretrained_text=null", "model.pretrained_vision=null"])
    tokenizer = load_tokenizer(folder / ckpt.TOKENIZER)
    return build_model(cfg.model, tokenizer), tokenizer


def load_exported(folder: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from an export folder; plain torch, no DeepSpeed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    model, tokenizer = _build(folder)
    state = load_file(str(folder / WEIGHTS))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval(), tokenizer

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
from knowlip.train.param_layout import FLAT_LAYOUT, FlatLayout

WEIGHTS = "model.safetensors"
DTYPES = dict(zip(EXPORT_DTYPES, (torch.float32, torch.bfloat16), strict=True))


def consolidated_state_dict(path: Path, verify: bool = True, model=None) -> dict[str, torch.Tensor]:
    """The full model state dict of a complete checkpoint, fp32: trainable weights from the engine's files,
    momentum weights and buffers from knowlip's own (the same tensors whatever the engine or world size).
    `model`: the checkpoint's model, unflattened, if the caller has built it (a flat layout is read from it)."""
    if verify:  # DeepSpeed's reader unpickles its files
        ckpt.verify_checkpoint(path)
    meta = ckpt.read_meta(path)
    if meta["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # it prints a lot
            weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=ckpt.ENGINE_TAG)
        if meta.get("param_layout") == FLAT_LAYOUT:  # DeepSpeed's names are the flat parameters': the model's back
            weights = FlatLayout.of(model if model is not None else _build(path)[0]).unflatten(weights)
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


def is_export(folder: Path) -> bool:
    """A knowlip export folder (not a checkpoint or a run)."""
    return ((folder / WEIGHTS).is_file() and (folder / ckpt.CONFIG).is_file()
            and not (folder / ckpt.CHECKPOINTS_DIR).is_dir())


def origin(source: str | Path) -> dict:
    """{"checkpoint", "step"} of what a model was loaded from: a checkpoint, a run or an export folder."""
    source = Path(source)
    if is_export(source):
        meta = json.loads((source / "export.json").read_text()) if (source / "export.json").is_file() else {}
        return {"checkpoint": meta.get("checkpoint"), "step": meta.get("step")}
    path = ckpt.resolve_checkpoint(source)
    return {"checkpoint": str(path), "step": ckpt.read_meta(path)["step"]}


def load_model(source: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config) from an export folder, a checkpoint or a run folder."""
    from knowlip.config import load_config

    source = Path(source)
    if is_export(source):
        model, tokenizer = load_exported(source, device)
        return model, tokenizer, load_config(source / ckpt.CONFIG)
    path = ckpt.resolve_checkpoint(source)
    model, tokenizer = _build(path)
    model.load_state_dict(consolidated_state_dict(path, model=model))
    return model.to(device).eval(), tokenizer, load_config(path / ckpt.CONFIG)


def _build(folder: Path):
    from knowlip.config import load_config
    from knowlip.model.build import build_model
    from knowlip.text.tokenizer import load_tokenizer

    cfg = load_config(folder / ckpt.CONFIG)
    tokenizer = load_tokenizer(folder / ckpt.TOKENIZER)
    return build_model(cfg.model, tokenizer, load_weights=False), tokenizer  # the weights come from `folder`


def load_exported(folder: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from an export folder; plain torch, no DeepSpeed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    model, tokenizer = _build(folder)
    state = load_file(str(folder / WEIGHTS))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval(), tokenizer


# -- transformers' BLIP ------------------------------------------------------------------------------------------

HF_DECODER = "decoder"  # the BlipForConditionalGeneration folder inside an hf export


def export_hf(source: str | Path | None, out: str | Path, loaded: tuple | None = None) -> Path:
    """A checkpoint, run or knowlip export -> out/ that transformers loads without knowlip:
    `BlipForImageTextRetrieval.from_pretrained(out)` (ITC, ITM) and `BlipForConditionalGeneration.from_pretrained(
    out / "decoder")`, each with its BlipProcessor; config.json's "knowlip" says how to build the input. `loaded`:
    load_model(source) when the caller has it already (source None: a model in memory, no checkpoint behind it)."""
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                              BlipImageProcessor, BlipProcessor)
    from transformers.initialization import no_init_weights

    from knowlip.model import hf_blip

    model, tokenizer, cfg = loaded or load_model(source)
    state, dims = model.state_dict(), model.dims
    missed = hf_blip.unmapped(state, dims)
    if missed:  # a weight the table does not know: a model change the export must learn first
        raise hf_blip.NotExportable(f"weights with no transformers name: {', '.join(missed[:5])}")
    config = BlipConfig(**hf_blip.blip_config(dims, len(tokenizer), model.special, _input_recipe(model, cfg, source)))
    out = Path(out)
    for role, cls, folder in (("retrieval", BlipForImageTextRetrieval, out),
                              ("decoder", BlipForConditionalGeneration, out / HF_DECODER)):
        with no_init_weights():  # every weight is set below (strict): its random initialisation would be wasted
            hf_model = cls(config).eval()
        hf_model.load_state_dict(hf_blip.hf_state_dict(state, dims, model.vision.in_channels, role), strict=True)
        hf_model.save_pretrained(folder)
        # BlipProcessor.from_pretrained(folder): the tokenizer, and images passed through as given (the SAR
        # normalisation is not an RGB pipeline: the config's "knowlip" entry says how to build them)
        passthrough = BlipImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, do_convert_rgb=False)
        BlipProcessor(image_processor=passthrough, tokenizer=tokenizer).save_pretrained(folder)
    return out


def _input_recipe(model, cfg, source) -> dict:
    """What a consumer needs to reproduce knowlip's input (written into config.json under "knowlip")."""
    from omegaconf import OmegaConf

    return {
        "pixel_values": f"the {model.vision.in_channels} SAR channel(s) normalised as `sar_normalisation` says "
                        f"(knowlip.ops.sar_norm), in this order, then zeros up to 3 channels; "
                        f"{model.dims.vision.image_size} px square (other multiples of the patch: "
                        "interpolate_pos_encoding=True)",
        "in_channels": model.vision.in_channels,
        "sar_normalisation": OmegaConf.to_container(cfg.norm),
        "itm_input_ids": "replace input_ids[:, 0] by enc_token_id, as knowlip and BLIP do for ITM",
        "decoder_input_ids": "replace input_ids[:, 0] by dec_token_id (the decoder's bos_token_id)",
        "enc_token_id": model.special.enc, "dec_token_id": model.special.dec, "mask_token_id": model.special.mask,
        "itc_temperature": float(model.temp.detach()[0]),
        "max_text_len": cfg.data.max_text_len,
        **(origin(source) if source is not None else {}),
    }

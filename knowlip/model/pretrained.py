"""Pretrained weights from local files (no hub): a BERT-family text encoder from a Hugging Face folder
(through transformers) and a ViT from a safetensors file with timm/DeiT names. Each loader maps names onto
ours, adapts shapes where the mapping is well defined (vocabulary rows, position tables, input channels) and
reports what it could not map."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knowlip.model.dims import TextDims
from knowlip.model.vit import interpolate_pos_embed

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # our parameter names that received weights
    missing: list[str] = field(default_factory=list)  # ours, left at initialisation
    unexpected: list[str] = field(default_factory=list)  # theirs, not used
    adapted: list[str] = field(default_factory=list)  # loaded with a shape adaptation

    def summary(self) -> str:
        return (f"{self.source}: loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected "
                f"{len(self.unexpected)}, adapted {self.adapted}")


# ----------------------------------------------------------------------------------------------------------
# Text: BERT family
# ----------------------------------------------------------------------------------------------------------

_BERT_LAYER = {
    "attention.self.query": "self_attn.query", "attention.self.key": "self_attn.key",
    "attention.self.value": "self_attn.value", "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_attn.norm", "intermediate.dense": "ffn.up", "output.dense": "ffn.down",
    "output.LayerNorm": "ffn.norm",
}
_BERT_EMBED = {"embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
               "embeddings.token_type_embeddings": "embeddings.token_type", "embeddings.LayerNorm": "embeddings.norm"}


def text_dims_from_hf(path: str | Path, max_positions: int | None = None) -> TextDims:
    """TextDims matching a local HF BERT-family checkpoint (to build a model its weights fit)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return TextDims(dim=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                    intermediate=c.intermediate_size, max_positions=max_positions or c.max_position_embeddings)


def _bert_name(name: str) -> str | None:
    for theirs, ours in _BERT_EMBED.items():
        if name.startswith(theirs + "."):
            return ours + name[len(theirs):]
    m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _BERT_LAYER:
        return f"layers.{m.group(1)}.{_BERT_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def load_hf_text(model, path: str | Path) -> LoadReport:
    """Map a BERT-family encoder onto model.text; the decoder's self-attention starts from the same weights
    (as BLIP initialises it), cross-attention stays at initialisation. Momentum copies are re-synced."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(path), local_files_only=True)
    theirs = {k.removeprefix("bert."): v for k, v in hf.state_dict().items()}
    ours = dict(model.text.named_parameters())
    report = LoadReport(str(path))
    with torch.no_grad():
        for name, tensor in theirs.items():
            target = _bert_name(name)
            if target is None or target not in ours:
                report.unexpected.append(name)
                continue
            _copy_adapting(ours[target], tensor, target, report)
            dec = target.replace(".self_attn.", ".dec_self_attn.")
            if dec != target and dec in ours:
                _copy_adapting(ours[dec], tensor, dec, report)
    with torch.no_grad():
        for name, tensor in _mlm_head(path).items():
            _copy_adapting(ours[_BERT_MLM_HEAD[name]], tensor, _BERT_MLM_HEAD[name], report)
    report.missing = [n for n in ours if n not in report.loaded]
    model.copy_params_to_momentum()
    log.info("pretrained text encoder %s", report.summary())
    return report


# BertForMaskedLM's head -> the decoder's language-model head (its output matrix is tied to the word embeddings)
_BERT_MLM_HEAD = {"cls.predictions.transform.dense.weight": "lm_transform.weight",
                  "cls.predictions.transform.dense.bias": "lm_transform.bias",
                  "cls.predictions.transform.LayerNorm.weight": "lm_norm.weight",
                  "cls.predictions.transform.LayerNorm.bias": "lm_norm.bias",
                  "cls.predictions.bias": "lm_bias"}


def _mlm_head(path: str | Path) -> dict[str, torch.Tensor]:
    """The masked-LM head's tensors when the checkpoint files hold one ({} for an encoder-only checkpoint)."""
    path, found = Path(path), {}
    for file in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if k in _BERT_MLM_HEAD})
    if not found:
        for file in sorted(path.glob("pytorch_model*.bin")):
            state = torch.load(file, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in state.items() if k in _BERT_MLM_HEAD})
    return found


def _copy_adapting(param: torch.Tensor, tensor: torch.Tensor, name: str, report: LoadReport) -> None:
    """Copy, allowing fewer/more rows for vocabularies and position tables (the overlap is copied)."""
    if param.shape == tensor.shape:
        param.copy_(tensor)
    elif (param.dim() == 2 and param.shape[1] == tensor.shape[1] and name.startswith("embeddings.")) or \
            (name == "lm_bias" and param.dim() == tensor.dim() == 1):  # vocabulary rows: the overlap is copied
        rows = min(param.shape[0], tensor.shape[0])
        param[:rows].copy_(tensor[:rows])
        report.adapted.append(f"{name}: {tensor.shape[0]} -> {param.shape[0]} rows")
    else:
        raise ValueError(f"pretrained {name}: shape {tuple(tensor.shape)} does not fit ours {tuple(param.shape)}; "
                         "build the model with text_dims_from_hf() for this checkpoint")
    report.loaded.append(name)


# ----------------------------------------------------------------------------------------------------------
# Vision: ViT in timm / DeiT naming, from safetensors
# ----------------------------------------------------------------------------------------------------------

_VIT_BLOCK = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "norm2",
              "mlp.fc1": "fc1", "mlp.fc2": "fc2"}


def _vit_name(name: str) -> str | None:
    name = name.removeprefix("vision.").removeprefix("visual_encoder.").removeprefix("module.")
    if name in ("cls_token", "pos_embed", "norm.weight", "norm.bias"):
        return name
    if name.startswith("patch_embed.proj."):
        return "patch_embed." + name.rsplit(".", 1)[1]
    if name.startswith("patch_embed."):
        return name
    m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _VIT_BLOCK:
        return f"blocks.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}.{m.group(3)}"
    m = re.match(r"blocks\.(\d+)\.(fc1|fc2|attn\.qkv|attn\.proj|norm1|norm2)\.(weight|bias)$", name)
    return f"blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def adapt_patch_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """(D, 3, p, p) RGB patch weights -> (D, C, p, p): each SAR channel gets the RGB sum / C, so a grey image
    replicated into RGB and the same image fed as C equal channels give the same embedding."""
    if weight.shape[1] == channels:
        return weight
    return weight.sum(dim=1, keepdim=True).expand(-1, channels, -1, -1) / channels


def load_vit_safetensors(model, path: str | Path) -> LoadReport:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ViT weights not found")
    theirs = load_file(str(path))
    vision = model.vision
    ours = dict(vision.named_parameters())
    report = LoadReport(str(path))
    with torch.no_grad():
        for name, tensor in theirs.items():
            target = _vit_name(name)
            if target is None or target not in ours:
                report.unexpected.append(name)
                continue
            if target == "patch_embed.weight" and tensor.shape[1] != vision.in_channels:
                tensor = adapt_patch_channels(tensor, vision.in_channels)
                report.adapted.append(f"patch_embed.weight: {theirs[name].shape[1]} -> {vision.in_channels} channels")
            if target == "pos_embed" and tensor.shape != ours[target].shape:
                grid = vision.dims.image_size // vision.dims.patch
                tensor = interpolate_pos_embed(tensor, grid)
                report.adapted.append(f"pos_embed: {theirs[name].shape[1]} -> {tensor.shape[1]} tokens")
            if tensor.shape != ours[target].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, ours {target} is "
                                 f"{tuple(ours[target].shape)}")
            ours[target].copy_(tensor)
            report.loaded.append(target)
    report.missing = [n for n in ours if n not in report.loaded]
    model.copy_params_to_momentum()
    log.info("pretrained vision encoder %s", report.summary())
    return report

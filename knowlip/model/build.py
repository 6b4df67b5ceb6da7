"""Build the model from the `model` config section and a tokenizer."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from knowlip.config import LossConfig
from knowlip.model.dims import preset
from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens


def loss_config(section) -> LossConfig:
    return LossConfig(**{f.name: getattr(section, f.name) for f in fields(LossConfig)})


def build_model(model_cfg, tokenizer, load_weights: bool = True) -> SarKnowLIP:
    """The model of `model_cfg`. With `pretrained_text`, the text side takes that checkpoint's shape (width,
    depth, heads: e.g. MiniLM's 384 x 6 beside a `tiny` ViT) and keeps the preset's position table and dropout.
    `load_weights=False`: the shape only, for weights that come from a knowlip checkpoint or export."""
    dims = preset(model_cfg.size, model_cfg.image_size, model_cfg.queue_size, model_cfg.text_dropout,
                  model_cfg.drop_path)
    if model_cfg.pretrained_text:
        from knowlip.model.pretrained import text_dims_from_hf

        if not Path(model_cfg.pretrained_text, "config.json").is_file():
            raise FileNotFoundError(f"{model_cfg.pretrained_text}/config.json: this model's text side was built "
                                    "from model.pretrained_text and takes its shape from that folder's config.json, "
                                    "which is not here")
        shape = text_dims_from_hf(model_cfg.pretrained_text, max_positions=dims.text.max_positions)
        dims = replace(dims, text=replace(shape, dropout=dims.text.dropout))
    model = SarKnowLIP(dims, len(tokenizer), SpecialTokens.from_tokenizer(tokenizer), model_cfg.in_channels,
                       model_cfg.attention, loss_config(model_cfg.losses))
    if not load_weights:
        return model
    if model_cfg.pretrained_text:
        from knowlip.model.pretrained import load_hf_text

        load_hf_text(model, model_cfg.pretrained_text)
    if model_cfg.pretrained_vision:
        from knowlip.model.pretrained import load_vit_safetensors

        load_vit_safetensors(model, model_cfg.pretrained_vision)
    return model

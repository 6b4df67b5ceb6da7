"""knowlip's model as transformers' BLIP: one table of weight names, the exact transforms where the two
architectures differ, and the BLIP config. Pure tensors; knowlip.train.export writes the folders.

Two transformers models come out of one knowlip model:
- `BlipForImageTextRetrieval` (ITC and ITM): the ViT, the text encoder with its self-attention, the cross-
  attention, the projections and the ITM head;
- `BlipForConditionalGeneration` (the decoder): the ViT and the text model with the decoder's own causal self-
  attention (`dec_self_attn`; BLIP shares everything else between encoder and decoder, transformers does not,
  so those weights are copied into both).

Where the architectures differ, exactly:
- transformers' patch embedding takes 3 channels: knowlip's C channels (C <= 3) come first, the others get zero
  weights, so pixel_values = the C normalised SAR channels followed by anything (zeros, or copies of a single
  channel as an RGB conversion makes) give the same embedding. More than 3 channels are refused.
- transformers' BLIP text embeddings have no token-type table: knowlip's single token-type row is added to every
  position embedding (word + position + type is the same sum).
- the LM head's output matrix is the word embeddings (tied in both); its bias is knowlip's `lm_bias`.
Not exported: the momentum (EMA) copies, the ITC queues and the temperature (kept in the config as
`knowlip.itc_temperature`, transformers' retrieval model returns raw cosine similarities).
"""

from __future__ import annotations

import torch

HF_IMAGE_CHANNELS = 3

# knowlip name (after "vision.blocks.{i}.") -> transformers name (after "vision_model.encoder.layers.{i}.")
VISION_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
VISION_TOP = {"vision.cls_token": "vision_model.embeddings.class_embedding",
              "vision.pos_embed": "vision_model.embeddings.position_embedding",
              "vision.patch_embed.bias": "vision_model.embeddings.patch_embedding.bias",
              "vision.norm.weight": "vision_model.post_layernorm.weight",
              "vision.norm.bias": "vision_model.post_layernorm.bias"}
# knowlip name (after "text.layers.{i}.", "{self}" the role's self-attention) -> transformers (after
# "<text>.encoder.layer.{i}.")
TEXT_LAYER = {"{self}.query": "attention.self.query", "{self}.key": "attention.self.key",
              "{self}.value": "attention.self.value", "{self}.out": "attention.output.dense",
              "{self}.norm": "attention.output.LayerNorm",
              "cross_attn.query": "crossattention.self.query", "cross_attn.key": "crossattention.self.key",
              "cross_attn.value": "crossattention.self.value", "cross_attn.out": "crossattention.output.dense",
              "cross_attn.norm": "crossattention.output.LayerNorm",
              "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ffn.norm": "output.LayerNorm"}
TEXT_TOP = {"text.embeddings.word.weight": "embeddings.word_embeddings.weight",
            "text.embeddings.norm.weight": "embeddings.LayerNorm.weight",
            "text.embeddings.norm.bias": "embeddings.LayerNorm.bias"}
RETRIEVAL_HEADS = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
                   "itm_head.weight", "itm_head.bias")
DECODER_HEAD = {"text.lm_transform.weight": "cls.predictions.transform.dense.weight",
                "text.lm_transform.bias": "cls.predictions.transform.dense.bias",
                "text.lm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
                "text.lm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
                "text.lm_bias": "cls.predictions.bias"}
ROLES = ("retrieval", "decoder")


class NotExportable(ValueError):
    """The model has something transformers' BLIP cannot hold exactly."""


def name_table(dims, role: str) -> dict[str, str]:
    """knowlip name -> transformers name for every weight copied as it is (the transforms come on top)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    text = "text_encoder." if role == "retrieval" else "text_decoder.bert."
    self_attn = "self_attn" if role == "retrieval" else "dec_self_attn"
    table = dict(VISION_TOP)
    for i in range(dims.vision.depth):
        for ours, theirs in VISION_BLOCK.items():
            for kind in ("weight", "bias"):
                table[f"vision.blocks.{i}.{ours}.{kind}"] = f"vision_model.encoder.layers.{i}.{theirs}.{kind}"
    table.update({ours: text + theirs for ours, theirs in TEXT_TOP.items()})
    for i in range(dims.text.layers):
        for ours, theirs in TEXT_LAYER.items():
            for kind in ("weight", "bias"):
                table[f"text.layers.{i}.{ours.format(self=self_attn)}.{kind}"] = \
                    f"{text}encoder.layer.{i}.{theirs}.{kind}"
    if role == "retrieval":
        table.update({name: name for name in RETRIEVAL_HEADS})
    else:
        table.update({ours: "text_decoder." + theirs for ours, theirs in DECODER_HEAD.items()})
    return table


def hf_state_dict(state: dict[str, torch.Tensor], dims, in_channels: int, role: str) -> dict[str, torch.Tensor]:
    """transformers' state dict of `role` from knowlip's (online weights, float32)."""
    if in_channels > HF_IMAGE_CHANNELS:
        raise NotExportable(f"transformers' BLIP patch embedding takes {HF_IMAGE_CHANNELS} channels; this model "
                            f"takes {in_channels} (model.in_channels) and cannot be mapped exactly")
    out = {theirs: state[ours] for ours, theirs in name_table(dims, role).items()}
    patch = state["vision.patch_embed.weight"]
    padded = patch.new_zeros(patch.shape[0], HF_IMAGE_CHANNELS, *patch.shape[2:])
    padded[:, :in_channels] = patch
    out["vision_model.embeddings.patch_embedding.weight"] = padded
    text = "text_encoder." if role == "retrieval" else "text_decoder.bert."
    token_type = state["text.embeddings.token_type.weight"][0]
    out[text + "embeddings.position_embeddings.weight"] = state["text.embeddings.position.weight"] + token_type
    if role == "decoder":  # tied to the word embeddings, as knowlip's lm_logits uses them
        out["text_decoder.cls.predictions.decoder.weight"] = state["text.embeddings.word.weight"]
        out["text_decoder.cls.predictions.decoder.bias"] = state["text.lm_bias"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def unmapped(state: dict[str, torch.Tensor], dims) -> list[str]:
    """knowlip weights that neither role carries, apart from what is left out on purpose (momentum copies,
    queues, temperature): an empty list, or the mapping misses something."""
    used = {"vision.patch_embed.weight", "text.embeddings.token_type.weight", "text.embeddings.position.weight"}
    for role in ROLES:
        used |= set(name_table(dims, role))
    left_out = ("vision_m.", "text_m.", "vision_proj_m.", "text_proj_m.", "image_queue", "text_queue",
                "queue_ptr", "temp")
    return sorted(n for n in state if n not in used and not n.startswith(left_out))


def blip_config(dims, vocab_size: int, special, extra: dict) -> dict:
    """The BlipConfig (as a dict for BlipConfig(**...)) of a knowlip model; `extra` goes under "knowlip"."""
    v, t = dims.vision, dims.text
    return {
        "vision_config": {"hidden_size": v.dim, "intermediate_size": int(v.dim * v.mlp_ratio),
                          "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
                          "patch_size": v.patch, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                          "attention_dropout": 0.0},
        "text_config": {"vocab_size": vocab_size, "hidden_size": t.dim, "encoder_hidden_size": v.dim,
                        "intermediate_size": t.intermediate, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions,
                        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": t.dropout,
                        "attention_probs_dropout_prob": t.dropout, "pad_token_id": special.pad,
                        "bos_token_id": special.dec, "eos_token_id": special.sep, "sep_token_id": special.sep,
                        "is_decoder": True, "tie_word_embeddings": True},
        "image_text_hidden_size": dims.embed_dim,
        "projection_dim": dims.embed_dim,
        "knowlip": extra,
    }

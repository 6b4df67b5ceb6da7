"""`knowlip export --format hf`: transformers' BLIP classes loaded from the export compute what knowlip's model
computes (CPU, float32): ITC similarities, ITM match probabilities, the decoder's logits on a masked caption.
On `tiny` as trained (the session's 2-rank DeepSpeed run) and on the `base` shape with every weight random
(norms and biases too, so a swapped LayerNorm would show); a planted mapping error must fail the comparison."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from knowlip.model import hf_blip

TOLERANCE = 1e-4  # relative to each output's scale


def inputs(shards, tokenizer, norm_cfg, image_size: int, n: int = 6):
    """n real chips, normalised as training does (resized to image_size), their captions with keywords masked."""
    from knowlip.data.loader import StreamingLoader
    from knowlip.ops.sar_norm import normalise_batch
    from knowlip.text.tokenizer import CaptionTokenizer

    batch = next(iter(StreamingLoader(shards, batch_size=n, drop_last=False)))
    images = normalise_batch(batch, norm_cfg, torch.device("cpu"), torch.float32)
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    encoded = CaptionTokenizer(tokenizer, 64)(batch["captions"], [m["keyword_spans"] for m in batch["meta"]])
    return images, encoded["input_ids"], encoded["attention_mask"], encoded["keyword_mask"]


@torch.no_grad()
def knowlip_outputs(model, images, ids, att, keywords) -> dict[str, torch.Tensor]:
    embeds, image_feat = model.encode_image(images)
    masked = ids.masked_fill(keywords, model.special.mask)
    return {"itc": image_feat @ model.encode_text(ids, att).t(),
            "itm": model.itm_logits(embeds, ids, att).softmax(-1)[:, 1],
            "decoder": model.decoder_logits(embeds, masked, att)[att.bool()]}


@torch.no_grad()
def transformers_outputs(folder: Path, images, ids, att, keywords) -> dict[str, torch.Tensor]:
    """The same through transformers alone, following the export's config.json "knowlip" recipe."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    retrieval = BlipForImageTextRetrieval.from_pretrained(folder).eval()
    captioner = BlipForConditionalGeneration.from_pretrained(folder / "decoder").eval()
    recipe = json.loads((folder / "config.json").read_text())["knowlip"]
    pixels = torch.cat([images, images.new_zeros(images.shape[0], 3 - images.shape[1], *images.shape[2:])], dim=1)
    itm_ids = ids.clone()
    itm_ids[:, 0] = recipe["enc_token_id"]
    dec_ids = ids.masked_fill(keywords, recipe["mask_token_id"])
    dec_ids[:, 0] = recipe["dec_token_id"]
    logits = captioner(pixel_values=pixels, input_ids=dec_ids, attention_mask=att).logits
    return {"itc": retrieval(pixel_values=pixels, input_ids=ids, attention_mask=att, use_itm_head=False).itm_score,
            "itm": retrieval(pixel_values=pixels, input_ids=itm_ids, attention_mask=att).itm_score.softmax(-1)[:, 1],
            "decoder": logits[att.bool()]}


def disagreements(ours: dict, theirs: dict) -> dict[str, float]:
    """Per output, the largest difference relative to the output's scale, where it exceeds TOLERANCE."""
    out = {}
    for key in ours:
        error = float((ours[key] - theirs[key]).abs().max() / ours[key].abs().max().clamp_min(1e-6))
        if not error <= TOLERANCE:
            out[key] = error
    return out


def compare(source: Path | None, folder: Path, shards, loaded: tuple | None = None) -> dict[str, float]:
    from knowlip.train.export import export_hf, load_model

    model, tokenizer, cfg = loaded or load_model(source)
    export_hf(source, folder, loaded)
    batch = inputs(shards, tokenizer, cfg.norm, model.dims.vision.image_size)
    return disagreements(knowlip_outputs(model, *batch), transformers_outputs(folder, *batch))


def random_model(size: str, tokenizer_folder: Path, image_size: int) -> tuple:
    """(model, tokenizer, config) of a `size` model whose every weight is random: no weight at its initial 0
    or 1, so that a LayerNorm or bias mapped to the wrong place shows."""
    from knowlip.config import load_config
    from knowlip.model.build import build_model
    from knowlip.text.tokenizer import load_tokenizer

    cfg = load_config(None, [f"model.size={size}", f"model.image_size={image_size}", "model.queue_size=16",
                             f"model.tokenizer={tokenizer_folder}", "mlflow.enabled=false"])
    tokenizer = load_tokenizer(tokenizer_folder)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return model.eval(), tokenizer, cfg


def test_tiny_as_trained_exports_to_transformers_and_computes_the_same(local_run, synth_shards, tmp_path):
    from transformers import BlipProcessor

    from knowlip.train.export import load_model

    assert compare(local_run, tmp_path / "hf", synth_shards) == {}
    recipe = json.loads((tmp_path / "hf" / "config.json").read_text())["knowlip"]
    assert recipe["step"] == 16 and recipe["in_channels"] == 1 and recipe["sar_normalisation"]["mode"] == "scale"
    _, tokenizer, cfg = load_model(local_run)
    images, ids, att, _ = inputs(synth_shards, tokenizer, cfg.norm, 32)
    pixels = torch.cat([images, torch.zeros(len(images), 2, 32, 32)], dim=1)
    captions = tokenizer.batch_decode(ids, skip_special_tokens=True)
    for folder in (tmp_path / "hf", tmp_path / "hf" / "decoder"):  # BlipProcessor-style: text as knowlip's
        processed = BlipProcessor.from_pretrained(folder)(images=list(pixels.numpy()), text=captions,
                                                          padding="max_length", max_length=64, return_tensors="pt")
        assert torch.equal(processed["pixel_values"], pixels)  # passed through: the SAR recipe made them
        assert torch.equal(processed["input_ids"], ids) and torch.equal(processed["attention_mask"], att)


def test_base_shape_with_random_weights_computes_the_same(session_tokenizer, synth_shards, tmp_path):
    loaded = random_model("base", session_tokenizer, 224)
    assert compare(None, tmp_path / "hf", synth_shards, loaded) == {}


def test_a_swapped_projection_in_the_table_is_caught(session_tokenizer, synth_shards, tmp_path, monkeypatch):
    """The comparison can fail: query and key of the text self-attention swapped in the name table."""
    loaded = random_model("tiny", session_tokenizer, 64)
    swapped = {**hf_blip.TEXT_LAYER, "{self}.query": "attention.self.key", "{self}.key": "attention.self.query"}
    monkeypatch.setattr(hf_blip, "TEXT_LAYER", swapped)
    wrong = compare(None, tmp_path / "hf", synth_shards, loaded)
    assert set(wrong) == {"itc", "itm", "decoder"} and min(wrong.values()) > 1e-3


def test_more_than_three_channels_are_refused_with_the_reason():
    state = {"vision.patch_embed.weight": torch.zeros(8, 4, 2, 2)}
    with pytest.raises(hf_blip.NotExportable, match="3 channels; this model takes 4"):
        hf_blip.hf_state_dict(state, None, 4, "retrieval")

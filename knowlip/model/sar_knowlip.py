"""SAR-KnowLIP: a BLIP-style model with ITC (momentum distillation + queue), ITM (hard negatives) and
keyword-masked reconstruction through the causal decoder.

ZeRO-3 rule kept here: every call runs the same modules the same number of times whatever the data (no
data-dependent branch skips a module; a loss with nothing to count is 0 * something, not absent). The
momentum update is a separate method, called by the trainer outside forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from knowlip.config import LossConfig
from knowlip.model.attention import AttentionStats
from knowlip.model.dims import ModelDims
from knowlip.model.distributed import gather_no_grad, gather_with_grad
from knowlip.model.scio import ScioBatch, choose_variants, repair_ids
from knowlip.model.losses import (ITM_NEGATIVE_FLOOR, float32_region, itc_loss, itm_targets,
                                  mask_for_reconstruction, reconstruction_loss, sample_hard_negatives)
from knowlip.model.text import TextModel
from knowlip.model.vit import VisionTransformer


def ema_update(moving: list[torch.Tensor], online: list[torch.Tensor], m: float,
               accumulators: list[torch.Tensor] | None = None) -> None:
    """moving <- m moving + (1 - m) online as multi-tensor ops (one launch per op, not per tensor). With float32
    `accumulators` (of bf16 weights) the update runs in them and is then rounded into `moving`."""
    target = moving if accumulators is None else accumulators
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, online, alpha=1 - m)
    if accumulators is not None:
        torch._foreach_copy_(moving, accumulators)


@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    cls: int
    sep: int
    mask: int
    enc: int
    dec: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialTokens":
        ids = tok.convert_tokens_to_ids
        return cls(tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, ids("[ENC]"),
                   ids("[DEC]"))

    def all(self) -> list[int]:
        return [self.pad, self.cls, self.sep, self.mask, self.enc, self.dec]


class SarKnowLIP(nn.Module):
    def __init__(self, dims: ModelDims, vocab_size: int, special: SpecialTokens, in_channels: int = 1,
                 attention_backend: str = "auto", losses: LossConfig = LossConfig()):
        super().__init__()
        self.dims, self.special, self.loss_cfg, self.vocab_size = dims, special, losses, vocab_size
        self.attention_stats = AttentionStats()
        stats, vdim = self.attention_stats, dims.vision.dim
        self.vision = VisionTransformer(dims.vision, in_channels, attention_backend, stats)
        self.text = TextModel(vocab_size, dims.text, vdim, attention_backend, stats)
        self.vision_proj = nn.Linear(vdim, dims.embed_dim)
        self.text_proj = nn.Linear(dims.text.dim, dims.embed_dim)
        self.itm_head = nn.Linear(dims.text.dim, 2)
        # Shape [1], not a 0-dim tensor: DeepSpeed ZeRO-3 cannot partition 0-dim parameters.
        self.temp = nn.Parameter(torch.tensor([losses.temp_init]))
        # Momentum (EMA) copies: frozen, updated by momentum_update(); the text copy is unimodal only.
        self.vision_m = copy.deepcopy(self.vision)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_m = TextModel(vocab_size, dims.text, vdim, attention_backend, stats, with_fusion=False)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        self.copy_params_to_momentum()
        e, q = dims.embed_dim, dims.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(q, e), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(q, e), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # -- momentum ------------------------------------------------------------------------------------------

    def _online_and_momentum(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        return ((self.vision, self.vision_m), (self.vision_proj, self.vision_proj_m),
                (self.text, self.text_m), (self.text_proj, self.text_proj_m))

    def momentum_towers(self) -> list[nn.Module]:
        """The frozen momentum (EMA) modules."""
        return [momentum for _, momentum in self._online_and_momentum()]

    def momentum_pairs(self):
        """(online, momentum) parameter pairs, matched by name."""
        for online, momentum in self._online_and_momentum():
            params = dict(online.named_parameters())
            for name, pm in momentum.named_parameters():
                yield params[name], pm

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        for p, pm in self.momentum_pairs():
            pm.copy_(p)
            pm.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """pm <- m pm + (1 - m) p for every pair, as two multi-tensor ops (hundreds of pairs: one launch each
        per pair was ~1.6k kernel launches a step on the GPU)."""
        online, moving = zip(*self.momentum_pairs())
        ema_update(list(moving), [p.detach() for p in online], self.loss_cfg.momentum)

    @torch.no_grad()
    def _enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, group) -> None:
        images, texts = gather_no_grad(image_feat_m, group), gather_no_grad(text_feat_m, group)
        q, n = self.image_queue.shape[0], images.shape[0]
        if n > q:
            images, texts, n = images[-q:], texts[-q:], q
        ptr = int(self.queue_ptr)
        idx = (torch.arange(n, device=images.device) + ptr) % q
        self.image_queue[idx] = images.to(self.image_queue.dtype)  # features may be bf16 under autocast
        self.text_queue[idx] = texts.to(self.text_queue.dtype)
        self.queue_ptr[0] = (ptr + n) % q

    # -- encoders ------------------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings, normalised ITC feature)."""
        embeds = self.vision(images)
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(ids, attention_mask.bool(), mode="text")
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = ids.clone()
        ids[:, 0] = self.special.enc
        hidden = self.text(ids, attention_mask.bool(), mode="multimodal", image_embeds=image_embeds)
        with float32_region(hidden):  # match logits in float32 under bf16
            head = self.itm_head
            return F.linear(hidden[:, 0].float(), head.weight.float(), head.bias.float())

    def decoder_logits(self, image_embeds: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = ids.clone()
        ids[:, 0] = self.special.dec
        hidden = self.text(ids, attention_mask.bool(), mode="decoder", image_embeds=image_embeds)
        return self.text.lm_logits(hidden)

    @torch.no_grad()
    def momentum_features(self, images, ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        image_feat_m = F.normalize(self.vision_proj_m(self.vision_m(images)[:, 0]), dim=-1)
        text_feat_m = F.normalize(self.text_proj_m(self.text_m(ids, attention_mask.bool())[:, 0]), dim=-1)
        return image_feat_m, text_feat_m

    # -- training forward ------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                keyword_mask: torch.Tensor, alpha: float | None = None, group=None,
                scio: ScioBatch | None = None) -> dict:
        """All three losses for one batch. `scio` (phases 2 and 3) screens the captions first: phase 2
        reconstructs the filtered caption, phase 3 repairs the flagged clause and trains all three losses on the
        repaired caption; out["scio"] says what it did."""
        cfg = self.loss_cfg
        alpha = cfg.alpha if alpha is None else alpha
        with torch.no_grad():  # in place, as BLIP: a clamp in the graph would zero the gradient out of range
            self.temp.clamp_(cfg.temp_min, cfg.temp_max)
        temp = self.temp
        image_embeds, image_feat = self.encode_image(images)
        rec_ids, rec_att, rec_kw = input_ids, attention_mask, keyword_mask  # the reconstruction target
        scio_out = None
        if scio is not None:
            scio_out = self._scio(image_embeds, image_feat, input_ids, attention_mask, scio)
            if scio.phase == 3:
                input_ids = rec_ids = scio_out["repaired"]
            else:
                rows = torch.arange(input_ids.shape[0], device=input_ids.device)
                pick, keep = scio_out["choice"].clamp_min(0), scio_out["choice"] < 0
                rec_ids = torch.where(keep[:, None], input_ids, scio.variant_ids[rows, pick])
                rec_att = torch.where(keep[:, None], attention_mask, scio.variant_attention[rows, pick])
                rec_kw = torch.where(keep[:, None], keyword_mask.bool(), scio.variant_keywords[rows, pick].bool())
        text_feat = self.encode_text(input_ids, attention_mask)
        image_feat_m, text_feat_m = self.momentum_features(images, input_ids, attention_mask)
        loss_itc, sims = itc_loss(image_feat, text_feat, temp, image_feat_m, text_feat_m, self.image_queue.clone(),
                                  self.text_queue.clone(), alpha, group, cfg.itc_columns)
        loss_itm, itm_acc = self._itm(image_embeds, input_ids, attention_mask, sims, group)
        loss_recon = self._reconstruction(image_embeds, rec_ids, rec_att, rec_kw)
        self._enqueue(image_feat_m, text_feat_m, group)
        loss = cfg.itc_weight * loss_itc + cfg.itm_weight * loss_itm + cfg.recon_weight * loss_recon
        out = {"loss": loss, "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(),
               "loss_recon": loss_recon.detach(), "itm_acc": itm_acc, "temp": temp.detach()[0].float()}
        if scio_out is not None:
            out["scio"] = scio_out
        return out

    @torch.no_grad()
    def _scio(self, image_embeds, image_feat, ids, attention_mask, scio: ScioBatch) -> dict[str, torch.Tensor]:
        """Screen every caption against its clause-removed variants in one batched pass (text encoder and ITM
        head on B x (K + 1) captions), then, in phase 3, repair the chosen clause with the decoder. Dropout is off
        while scoring: a score must not depend on a dropout draw."""
        b, k, length = scio.variant_ids.shape
        all_ids = torch.cat([ids[:, None], scio.variant_ids], dim=1).reshape(b * (k + 1), length)
        all_att = torch.cat([attention_mask[:, None], scio.variant_attention], dim=1).reshape(b * (k + 1), length)
        was_training = self.text.training
        self.text.eval()
        try:
            feats = self.encode_text(all_ids, all_att).float().view(b, k + 1, -1)
            sims = (image_feat.detach().float()[:, None, :] * feats).sum(-1)
            match = self.itm_logits(image_embeds.detach().repeat_interleave(k + 1, dim=0), all_ids, all_att)
            match = match.softmax(dim=-1)[:, 1].view(b, k + 1)
            choice, gain, flagged = choose_variants(sims[:, 0], sims[:, 1:], match[:, 0], match[:, 1:], scio.valid)
            out = {"choice": choice, "gain": gain, "flagged": flagged}
            if scio.phase == 3:
                rows = torch.arange(b, device=ids.device)
                positions = scio.field_masks[rows, choice.clamp_min(0)] & (choice >= 0)[:, None]
                masked = ids.masked_fill(positions, self.special.mask)
                logits = self.decoder_logits(image_embeds.detach(), masked, attention_mask)
                out["repaired"] = repair_ids(ids, positions, logits)
        finally:
            self.text.train(was_training)
        return out

    def _itm(self, image_embeds, ids, attention_mask, sims, group) -> tuple[torch.Tensor, torch.Tensor]:
        b = ids.shape[0]
        labels = sims["labels"]
        ids_all, att_all = gather_no_grad(ids, group), gather_no_grad(attention_mask, group)
        # Templated captions repeat: a column whose caption equals the positive's is no negative, either way.
        same_text = (ids[:, None, :] == ids_all[None, :, :]).all(-1)
        # One sampling call for both directions: rows [images vs texts; texts vs images] of the global batch.
        negatives = sample_hard_negatives(torch.cat([sims["sim_i2t"], sims["sim_t2i"]]), torch.cat([labels, labels]),
                                          torch.cat([same_text, same_text]),
                                          floor=ITM_NEGATIVE_FLOOR[self.loss_cfg.itm_negatives])
        neg_text_idx, neg_image_idx = negatives[:b], negatives[b:]  # a text per image, an image per text
        image_all = gather_with_grad(image_embeds, group)
        pair_images = torch.cat([image_embeds, image_embeds, image_all[neg_image_idx]], dim=0)
        pair_ids = torch.cat([ids, ids_all[neg_text_idx], ids], dim=0)
        pair_att = torch.cat([attention_mask, att_all[neg_text_idx], attention_mask], dim=0)
        logits = self.itm_logits(pair_images, pair_ids, pair_att)
        targets = itm_targets(b, logits.device)
        acc = (logits.argmax(1) == targets).float().mean().detach()
        return F.cross_entropy(logits.float(), targets), acc

    def _reconstruction(self, image_embeds, ids, attention_mask, keyword_mask) -> torch.Tensor:
        special = torch.tensor(self.special.all(), device=ids.device)
        masked, labels = mask_for_reconstruction(ids, attention_mask, keyword_mask, special, self.special.mask,
                                                 self.vocab_size, self.loss_cfg.other_mask_prob)
        logits = self.decoder_logits(image_embeds, masked, attention_mask)
        return reconstruction_loss(logits, labels, self.loss_cfg.label_smoothing)

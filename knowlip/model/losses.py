"""The three SAR-KnowLIP losses (method.md), each a function of features and token tensors.

Distributed choices are explicit: ITC follows BLIP (each rank's online rows against the momentum features of
the global batch, gathered without grad, then the queue), so no gradient crosses ranks and logit memory grows
linearly with the global batch plus the queue; ITM samples its hard negatives over the global batch in one
vectorised call, never a caption whose text equals the positive's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from knowlip.model.distributed import gather_no_grad, gather_with_grad, world


def float32_region(x: torch.Tensor):
    """Autocast off: similarity logits and their softmax stay in float32 under bf16 training."""
    return torch.autocast(x.device.type, enabled=False)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
             image_feat_m: torch.Tensor | None = None, text_feat_m: torch.Tensor | None = None,
             image_queue: torch.Tensor | None = None, text_queue: torch.Tensor | None = None, alpha: float = 0.0,
             group=None, columns: str = "momentum") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image-text contrastive loss as BLIP computes it, in float32.

    Rows: this rank's online features image_feat/text_feat (B, E), L2-normalised, with grad.
    Columns: the MOMENTUM features *_feat_m of the global batch (gathered from every rank, no grad), then the
    queue (Q, E) of momentum features of past batches. The distillation targets are softmax(momentum row x the
    same columns / temp), mixed with the one-hot positive by `alpha`. Row i of rank r matches column r*B + i.
    columns="online" (or no momentum features) puts the online features of the global batch, gathered with grad,
    before the queue instead (an ablation: knowlip's form before it followed BLIP); the distillation targets still
    come from the momentum features.
    Returns (loss, extras) where extras holds the rows' similarities to the global batch (hard negatives).
    """
    rank, _ = world(group)
    b = image_feat.shape[0]
    with float32_region(image_feat):
        image_feat, text_feat, temp = image_feat.float(), text_feat.float(), temp.float()
        if image_feat_m is not None:
            image_feat_m, text_feat_m = image_feat_m.detach().float(), text_feat_m.detach().float()
            image_m_cols = gather_no_grad(image_feat_m, group, check_sizes=True)
            text_m_cols = gather_no_grad(text_feat_m, group)
        if image_feat_m is None or columns == "online":
            image_cols = gather_with_grad(image_feat, group, check_sizes=True)
            text_cols = gather_with_grad(text_feat, group)
        else:
            image_cols, text_cols = image_m_cols, text_m_cols
        global_b = image_cols.shape[0]
        if text_queue is not None:
            queue_t, queue_i = text_queue.detach().float(), image_queue.detach().float()
            text_cols, image_cols = torch.cat([text_cols, queue_t]), torch.cat([image_cols, queue_i])
            if image_feat_m is not None:
                text_m_cols, image_m_cols = torch.cat([text_m_cols, queue_t]), torch.cat([image_m_cols, queue_i])
        labels = torch.arange(b, device=image_feat.device) + rank * b
        sim_i2t = image_feat @ text_cols.t() / temp
        sim_t2i = text_feat @ image_cols.t() / temp
        targets_i2t = targets_t2i = F.one_hot(labels, sim_i2t.shape[1]).float()
        if alpha > 0 and image_feat_m is not None:
            with torch.no_grad():
                one_hot = targets_i2t
                targets_i2t = alpha * (image_feat_m @ text_m_cols.t() / temp).softmax(1) + (1 - alpha) * one_hot
                targets_t2i = alpha * (text_feat_m @ image_m_cols.t() / temp).softmax(1) + (1 - alpha) * one_hot
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
    extras = {"sim_i2t": sim_i2t[:, :global_b].detach(), "sim_t2i": sim_t2i[:, :global_b].detach(),
              "labels": labels}
    return (loss_i2t + loss_t2i) / 2, extras


ITM_NEGATIVE_FLOOR = {"blip_pretrain": 1e-4, "blip_retrieval": 0.0}  # model.losses.itm_negatives


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, exclude: torch.Tensor | None = None,
                          generator: torch.Generator | None = None, floor: float = 0.0) -> torch.Tensor:
    """For each row, one column index drawn with probability softmax(sim) over the allowed negatives; with a
    `floor`, BLIP pretraining's weights instead: softmax(sim) over the whole row + floor, then the positive and
    the excluded columns zeroed (every allowed negative keeps a chance of at least about `floor`).

    sim: (B, G) similarities of local rows to the global batch; positives: (B,) the positive column per row;
    exclude: (B, G) True where a column may not be a negative (its caption equals the positive's). The positive is
    never drawn. A row whose columns are all excluded draws uniformly among the columns other than its positive.
    One torch.multinomial call for the whole batch.
    """
    if sim.shape[1] < 2:
        raise ValueError("hard negatives need a global batch of at least 2 pairs")
    not_positive = torch.ones_like(sim, dtype=torch.bool).scatter(1, positives[:, None], False)
    allowed = not_positive if exclude is None else not_positive & ~exclude
    stuck = ~allowed.any(1, keepdim=True)  # every other caption equals the positive's
    if floor > 0:
        weights = (sim.float().softmax(dim=1) + floor).masked_fill(~allowed, 0.0)
        weights = torch.where(stuck, not_positive.float(), weights)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)
    logits = sim.float().masked_fill(~allowed, float("-inf"))
    uniform = torch.zeros_like(logits).masked_fill(~not_positive, float("-inf"))
    logits = torch.where(stuck, uniform, logits)
    return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)


def itm_targets(batch: int, device) -> torch.Tensor:
    """Labels for [positives; image-with-negative-text; negative-image-with-text]: 1, 0, 0."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(2 * batch, dtype=torch.long, device=device)])


def mask_for_reconstruction(ids: torch.Tensor, attention_mask: torch.Tensor, keyword_mask: torch.Tensor,
                            special: torch.Tensor, mask_id: int, vocab_size: int, other_prob: float = 0.05,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask keywords always and other tokens with `other_prob`; of masked tokens 50% -> [MASK], 10% -> a random
    token, 40% unchanged. Returns (masked ids, labels) with labels -100 where nothing is to be predicted."""
    maskable = attention_mask.bool() & ~torch.isin(ids, special)
    rand = lambda: torch.rand(ids.shape, device=ids.device, generator=generator)
    chosen = maskable & (keyword_mask.bool() | (rand() < other_prob))
    action = rand()
    masked = ids.clone()
    masked[chosen & (action < 0.5)] = mask_id
    random_slots = chosen & (action >= 0.5) & (action < 0.6)
    random_ids = torch.randint(0, vocab_size, ids.shape, device=ids.device, generator=generator)
    masked[random_slots] = random_ids[random_slots]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return masked, labels


def reconstruction_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Shifted next-token cross-entropy at masked positions only: logits at t predict the token at t + 1.

    Always a function of `logits` (0 * sum when nothing is masked) so every rank runs the same backward.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    count = (shifted_labels != -100).sum()
    total = F.cross_entropy(shifted_logits.float(), shifted_labels, ignore_index=-100,
                            label_smoothing=label_smoothing, reduction="sum")
    return total / count.clamp_min(1)

"""The model-side pieces of SCIO (self-consistent iterative optimisation, method.md): pure functions on tensors,
called inside the model's forward so that ZeRO-3 sees one top-level forward per step.

- Screen (phases 2 and 3): each caption and its clause-removed variants are scored against the image by ITC
  similarity and ITM match probability (no grad). A variant whose two scores are both higher than the
  original's flags its clause as noise; the variant with the largest total gain is chosen.
- Repair (phase 3): the chosen clause's keyword tokens are masked and the decoder fills them with its argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScioBatch:
    """What the model needs for one batch in phases 2 and 3 (built by knowlip.train.scio_loop)."""

    phase: int
    variant_ids: torch.Tensor  # (B, K, L) each caption without clause k
    variant_attention: torch.Tensor  # (B, K, L)
    variant_keywords: torch.Tensor  # (B, K, L) keyword mask of each variant (its reconstruction target)
    field_masks: torch.Tensor  # (B, K, L) positions of clause k's keywords in the original caption's tokens
    valid: torch.Tensor  # (B, K) False where a variant cannot be formed (an unparsable caption)

    def to(self, device) -> "ScioBatch":
        return ScioBatch(self.phase, *(t.to(device) for t in (self.variant_ids, self.variant_attention,
                                                              self.variant_keywords, self.field_masks, self.valid)))


def choose_variants(sim_orig: torch.Tensor, sim_var: torch.Tensor, match_orig: torch.Tensor,
                    match_var: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sim_*: ITC similarity, match_*: ITM match probability; *_orig (B,), *_var (B, K).
    Returns (choice (B,): the chosen variant, -1 to keep the caption; gain (B,): its summed score gain, 0 when
    kept; flagged (B, K): variants whose removal raised both scores)."""
    gain_itc = sim_var - sim_orig[:, None]
    gain_itm = match_var - match_orig[:, None]
    flagged = (gain_itc > 0) & (gain_itm > 0) & valid
    total = (gain_itc + gain_itm).masked_fill(~flagged, float("-inf"))
    best_gain, best = total.max(dim=1)
    chosen = flagged.any(dim=1)
    return torch.where(chosen, best, -1), torch.where(chosen, best_gain, 0.0), flagged


def repair_ids(ids: torch.Tensor, positions: torch.Tensor, decoder_logits: torch.Tensor) -> torch.Tensor:
    """Write the decoder's argmax into `positions` (B, L). The causal decoder's logits at t predict token t + 1,
    so the token for position t is the argmax at t - 1 (the one-token shift)."""
    predicted_next = decoder_logits.argmax(dim=-1)
    for_position = torch.cat([ids[:, :1], predicted_next[:, :-1]], dim=1)
    return torch.where(positions, for_position, ids)

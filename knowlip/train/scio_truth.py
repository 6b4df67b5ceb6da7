"""SCIO scored against known caption noise (`synth.caption_noise`): did the loop flag the clause that was
corrupted, and did its repair write the true clause back?

A sample's truth comes from its metadata ("caption_noise", packed from captions.jsonl): absent when the data
says nothing (real captions), None for a caption known to be true, {"field", "original"} for a corrupted one.

- Flags (phases 2 and 3): the clause the loop chose to remove (one per caption at most) is a flag. It is true
  when that clause is the corrupted one. Precision: true flags / flags; recall: true flags / corrupted captions
  screened. Per field as well.
- Repairs (phase 3): of the true flags, the share whose repaired keyword tokens equal the true clause's tokens.
  The repair refills the corrupted clause's token positions, so it can only be exact where the true clause has as
  many tokens; that share is reported beside it (scio_repair_length_match).

Counts are summed over ranks and logging windows; rates come from the sums and are absent (not 0) where their
denominator is 0, e.g. on data without ground truth.
"""

from __future__ import annotations

from typing import Sequence

import torch

from knowlip.text.caption import FIELDS, Caption, CaptionError, parse_caption

NO_TRUTH = "?"  # the data says nothing about this caption
COUNTERS = ("known", "corrupted", "flag_true", "flag_false", "repair_scored", "repair_length_match",
            "repair_exact", *(f"{kind}_{f}" for kind in ("corrupted", "flags", "flag_true") for f in FIELDS))


def corrupted_fields(metas: Sequence[dict]) -> list[str | None]:
    """Per sample: the corrupted field, None for a caption known to be true, NO_TRUTH where nothing is known."""
    out: list[str | None] = []
    for meta in metas:
        if "caption_noise" not in meta:
            out.append(NO_TRUTH)
        else:
            noise = meta["caption_noise"]
            out.append(noise["field"] if noise else None)
    return out


def score_flags(choice: Sequence[int], corrupted: Sequence[str | None]) -> dict[str, int]:
    """Counts for one batch: `choice` the field index the loop removed per caption (-1: kept)."""
    counts = dict.fromkeys(COUNTERS, 0)
    for c, truth in zip(choice, corrupted):
        if truth == NO_TRUTH:
            continue
        counts["known"] += 1
        if truth is not None:
            counts["corrupted"] += 1
            counts[f"corrupted_{truth}"] += 1
        if c < 0:
            continue
        flagged = FIELDS[c]
        counts[f"flags_{flagged}"] += 1
        if flagged == truth:
            counts["flag_true"] += 1
            counts[f"flag_true_{flagged}"] += 1
        else:
            counts["flag_false"] += 1
    return counts


def score_repairs(choice: Sequence[int], metas: Sequence[dict], captions: Sequence[str], repaired: torch.Tensor,
                  field_masks: torch.Tensor, text_tokenizer) -> dict[str, int]:
    """Counts for one phase-3 batch: of the true flags, how many repairs wrote the true clause's tokens.
    repaired (B, L): the caption ids after repair; field_masks (B, K, L): each clause's keyword tokens."""
    counts = {"repair_scored": 0, "repair_length_match": 0, "repair_exact": 0}
    rows, true_texts, true_spans = [], [], []
    for i, (c, meta) in enumerate(zip(choice, metas)):
        noise = meta.get("caption_noise")
        if c < 0 or not noise or noise["field"] != FIELDS[c]:
            continue
        try:
            caption = parse_caption(captions[i])
        except CaptionError:
            continue
        true_caption = Caption({**caption.clauses, noise["field"]: noise["original"]})
        rows.append(i)
        true_texts.append(true_caption.text())
        true_spans.append([s for s in true_caption.keyword_spans() if s[0] == noise["field"]])
    if not rows:
        return counts
    true_ids = text_tokenizer(true_texts)["input_ids"]
    true_masks = text_tokenizer.span_masks(true_texts, [true_spans])[:, 0]
    for j, i in enumerate(rows):
        written = repaired[i].cpu()[field_masks[i, choice[i]].cpu()]
        truth = true_ids[j][true_masks[j]]
        counts["repair_scored"] += 1
        if len(written) == len(truth):
            counts["repair_length_match"] += 1
            counts["repair_exact"] += int(torch.equal(written, truth))
    return counts


def rates(counts: dict[str, float]) -> dict[str, float]:
    """The metrics fields (scio_flag_precision, scio_flag_recall, per field, scio_repair_acc, ...) from summed
    counts; a rate whose denominator is 0 is left out."""
    out: dict[str, float] = {}

    def ratio(name: str, numerator: float, denominator: float) -> None:
        if denominator > 0:
            out[name] = round(numerator / denominator, 4)

    ratio("scio_flag_precision", counts["flag_true"], counts["flag_true"] + counts["flag_false"])
    ratio("scio_flag_recall", counts["flag_true"], counts["corrupted"])
    for f in FIELDS:
        ratio(f"scio_flag_precision_{f}", counts[f"flag_true_{f}"], counts[f"flags_{f}"])
        ratio(f"scio_flag_recall_{f}", counts[f"flag_true_{f}"], counts[f"corrupted_{f}"])
    ratio("scio_repair_acc", counts["repair_exact"], counts["repair_scored"])
    ratio("scio_repair_length_match", counts["repair_length_match"], counts["repair_scored"])
    if counts["known"] > 0:
        out["scio_truth_corrupted"] = int(counts["corrupted"])  # corrupted captions screened in the window
    return out

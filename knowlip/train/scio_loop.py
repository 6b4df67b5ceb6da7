"""SCIO on the training side: which phase a step is in, the clause-removed variants of a batch's captions,
the counters logged to metrics.jsonl, and the (original, filtered, repaired) samples a user can read.

Phases over train.steps (scio.phase_starts, two fractions): 1 plain; 2 screen and filter (the filtered caption
is the reconstruction target); 3 repair (the flagged clause refilled by the decoder; all three losses on it).
The screened clauses are the eight of the caption; the geographic clause comes from the metadata, not from a
captioner, and is never removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from knowlip.model.scio import ScioBatch
from knowlip.train import scio_truth
from knowlip.text.caption import FIELDS, CaptionError, parse_caption


def phase_starts(cfg) -> tuple[int, int]:
    """The first step (0-based) of phases 2 and 3."""
    total = cfg.train.steps
    return tuple(round(f * total) for f in cfg.scio.phase_starts)


def phase_at(step: int, cfg) -> int:
    """The phase of the step about to run (0-based); always 1 with scio.enabled=false."""
    if not cfg.scio.enabled:
        return 1
    second, third = phase_starts(cfg)
    return 1 if step < second else 2 if step < third else 3


def prepare(captions: list[str], text_tokenizer, phase: int) -> tuple[ScioBatch, list[list[str]]]:
    """Variants of every caption (one per clause removed), tokenised in one call, and the token positions of
    each clause's keywords in the original caption. Returns (batch on the CPU, variant texts)."""
    parsed = []
    for text in captions:
        try:
            parsed.append(parse_caption(text))
        except CaptionError:
            parsed.append(None)  # free text: nothing to screen, the caption is kept
    texts, spans, valid = [], [], []
    for text, cap in zip(captions, parsed):
        for field in FIELDS:
            variant = cap.without(field) if cap is not None and field in cap.clauses else None
            texts.append(variant.text() if variant else text)
            spans.append(variant.keyword_spans() if variant else [])
            valid.append(variant is not None)
    encoded = text_tokenizer(texts, spans)
    b, k = len(captions), len(FIELDS)
    shape = lambda t: t.view(b, k, -1)
    spans_by_field = [[[s for s in cap.keyword_spans() if s[0] == f] if cap else [] for cap in parsed]
                      for f in FIELDS]
    field_masks = text_tokenizer.span_masks(captions, spans_by_field)
    batch = ScioBatch(phase, shape(encoded["input_ids"]), shape(encoded["attention_mask"]),
                      shape(encoded["keyword_mask"]), field_masks, torch.tensor(valid).view(b, k))
    return batch, [texts[i * k:(i + 1) * k] for i in range(b)]


TRUTH = "truth_"  # the prefix of scio_truth's counters among ScioStats' own


def truth_part(counters: dict[str, float]) -> dict[str, float]:
    return {k[len(TRUTH):]: v for k, v in counters.items() if k.startswith(TRUTH)}


def score(out: dict[str, torch.Tensor], batch: dict, screen: ScioBatch, text_tokenizer) -> dict[str, int] | None:
    """This batch's ground-truth counts (scio_truth), None when its samples carry no truth."""
    corrupted = scio_truth.corrupted_fields(batch["meta"])
    if all(c == scio_truth.NO_TRUTH for c in corrupted):
        return None
    choice = out["choice"].cpu().tolist()
    counts = scio_truth.score_flags(choice, corrupted)
    if "repaired" in out:
        counts.update(scio_truth.score_repairs(choice, batch["meta"], batch["captions"], out["repaired"],
                                               screen.field_masks, text_tokenizer))
    return counts


class ScioStats:
    """Counters over the logging window and over the run (the run totals go into checkpoints), with the
    ground-truth counts of scio_truth where the data knows which clauses are wrong."""

    def __init__(self) -> None:
        self.window = self._zeros()
        self.totals = self._zeros()

    @staticmethod
    def _zeros() -> dict[str, float]:
        return {"screened": 0, "changed": 0, "gain_sum": 0.0, **{f"flagged_{f}": 0 for f in FIELDS},
                **{TRUTH + k: 0 for k in scio_truth.COUNTERS}}

    def add(self, out: dict[str, torch.Tensor], truth_counts: dict[str, int] | None = None) -> None:
        choice, gain, flagged = out["choice"].cpu(), out["gain"].cpu(), out["flagged"].cpu()
        counts = {"screened": len(choice), "changed": int((choice >= 0).sum()), "gain_sum": float(gain.sum()),
                  **{f"flagged_{f}": int(flagged[:, i].sum()) for i, f in enumerate(FIELDS)},
                  **{TRUTH + k: v for k, v in (truth_counts or {}).items()}}
        for target in (self.window, self.totals):
            for key, value in counts.items():
                target[key] += value

    def take_window(self, all_reduce=None) -> dict[str, float]:
        """The window's counters summed over ranks (all_reduce: a sum over ranks), as metrics fields."""
        keys = list(self.window)
        values = [float(self.window[k]) for k in keys]
        if all_reduce is not None:
            values = all_reduce(values)
        summed = dict(zip(keys, values))
        self.window = self._zeros()
        out = {f"scio_{k}": int(v) for k, v in summed.items() if k != "gain_sum" and not k.startswith(TRUTH)}
        out["scio_mean_gain"] = round(summed["gain_sum"] / summed["changed"], 5) if summed["changed"] else 0.0
        return {**out, **scio_truth.rates(truth_part(summed))}

    def run_rates(self) -> dict[str, float]:
        """The ground-truth rates over the whole run so far (this rank's samples)."""
        return scio_truth.rates(truth_part(self.totals))

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {**self._zeros(), **state.get("totals", {})}


def write_samples(path: Path, step: int, phase: int, keys: list[str], captions: list[str],
                  variants: list[list[str]], out: dict[str, torch.Tensor], decode, limit: int) -> None:
    """Append a few (original, flagged clause, filtered, repaired) records, changed captions first."""
    choice = out["choice"].cpu().tolist()
    order = sorted(range(len(choice)), key=lambda i: choice[i] < 0)[:limit]
    with path.open("a") as f:
        for i in order:
            c = choice[i]
            record = {"step": step, "phase": phase, "key": keys[i], "original": captions[i],
                      "flagged": FIELDS[c] if c >= 0 else None, "filtered": variants[i][c] if c >= 0 else captions[i],
                      "gain": round(float(out["gain"][i]), 5)}
            if "repaired" in out:
                record["repaired"] = decode(out["repaired"][i])
            f.write(json.dumps(record) + "\n")

"""Zero-shot evaluation on held-out shards: image<->text retrieval and clause-prompt classification.

Every rank embeds its slice of the shards (the streaming loader splits them), the embeddings are gathered, and
every rank computes the same metrics (so the calls stay identical across ranks under ZeRO-3). Used by
`knowlip eval` and by the trainer every `eval.every` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knowlip.config import EvalConfig
from knowlip.data.loader import StreamingLoader
from knowlip.distributed import all_gather_objects, get_world_size, rank_and_world
from knowlip.eval.metrics import classification_metrics, retrieval_metrics
from knowlip.ops.sar_norm import normalise_batch
from knowlip.text.caption import FIELDS, CaptionError, clause_text, parse_caption

DEFAULT_FIELDS = tuple(EvalConfig().fields)


@dataclass
class Embeddings:
    image: torch.Tensor  # (N, E) float32, normalised
    text: torch.Tensor  # (N, E)
    clauses: list[dict[str, str]]  # each sample's eight clauses (field -> keywords)

    def keys(self) -> list[tuple[str, ...]]:
        return [tuple(c[f] for f in FIELDS) for c in self.clauses]


def eval_loader(shards, batch_size: int, text_tokenizer, rank: int = 0, world_size: int = 1) -> StreamingLoader:
    return StreamingLoader(shards, batch_size, rank, world_size, drop_last=False, tokenizer=text_tokenizer)


@torch.no_grad()
def embed(model, loader: StreamingLoader, norm_cfg, device: torch.device, dtype: torch.dtype) -> Embeddings:
    """This rank's embeddings of the rest of the loader's epoch (a fresh loader: all of it); the model is put in
    eval mode and restored."""
    was_training = model.training
    model.eval()
    images, texts, clauses = [], [], []
    try:
        for batch in loader:
            pixels = normalise_batch(batch, norm_cfg, device, dtype)
            images.append(model.encode_image(pixels)[1].float().cpu())
            ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            texts.append(model.encode_text(ids, att).float().cpu())
            clauses += [_clauses(c, k) for c, k in zip(batch["captions"], batch["keys"])]
    finally:
        model.train(was_training)
    return Embeddings(torch.cat(images), torch.cat(texts), clauses)


def _clauses(caption: str, key: str) -> dict[str, str]:
    try:
        parsed = parse_caption(caption).clauses
    except CaptionError as exc:
        raise ValueError(f"sample {key}: caption does not parse, cannot be evaluated: {exc}") from exc
    return {f: parsed[f] for f in FIELDS}


def gather(e: Embeddings) -> Embeddings:
    """Every rank's embeddings, in rank order, on every rank."""
    if get_world_size() == 1:
        return e
    parts = all_gather_objects((e.image, e.text, e.clauses))
    return Embeddings(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                      [c for p in parts for c in p[2]])


FILLER = {"about", "around", "covering", "nearly", "over", "under", "of", "with", "and", "at", "in", "the", "some"}


def class_of(value: str) -> str:
    """A clause value's class: its head words, the text before its first number without the filler that led up to
    it ('a lake in the north-west covering about 12 percent' -> 'a lake in the north-west'). Quantities would
    split a field into dozens of one-off classes that no prompt can tell apart."""
    words = value.split()
    cut = next((i for i, w in enumerate(words) if any(ch.isdigit() for ch in w)), len(words))
    head = words[:cut]
    while cut < len(words) and head and head[-1].lower() in FILLER:
        head.pop()
    return " ".join(head) or value


@torch.no_grad()
def class_prompts(model, text_tokenizer, clauses: list[dict[str, str]], field: str, device) -> tuple[list[str], torch.Tensor]:
    """The classes of one clause (its values' head words, sorted) and their prompt embeddings."""
    classes = sorted({class_of(c[field]) for c in clauses})
    prompts = [clause_text(field, kw) for kw in classes]
    encoded = text_tokenizer(prompts)
    was_training = model.training
    model.eval()
    try:
        feats = model.encode_text(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
    finally:
        model.train(was_training)
    return classes, feats.float().cpu()


def run_eval(model, shards, text_tokenizer, norm_cfg, device, dtype, batch_size: int = 64,
             fields=DEFAULT_FIELDS) -> dict:
    """Embed the shards (a folder or a loaded ShardIndex) over this job's ranks, gather, evaluate (the same result
    on every rank)."""
    rank, world = rank_and_world()
    loader = eval_loader(shards, batch_size, text_tokenizer, rank, world)
    return evaluate(model, gather(embed(model, loader, norm_cfg, device, dtype)), text_tokenizer, device, fields)


def evaluate(model, e: Embeddings, text_tokenizer, device, fields=DEFAULT_FIELDS) -> dict:
    """Retrieval both ways and classification for each field, from gathered embeddings."""
    keys = e.keys()
    index = {k: i for i, k in enumerate(sorted(set(keys)))}
    caption_id = torch.tensor([index[k] for k in keys])
    relevant = caption_id[:, None] == caption_id[None, :]
    sim = e.image @ e.text.t()
    out = {"samples": len(keys), "distinct_captions": len(index),
           "image_to_text": retrieval_metrics(sim, relevant), "text_to_image": retrieval_metrics(sim.t(), relevant)}
    for field in fields:
        classes, prompts = class_prompts(model, text_tokenizer, e.clauses, field, device)
        truth = torch.tensor([classes.index(class_of(c[field])) for c in e.clauses])
        out[f"classify_{field}"] = classification_metrics(e.image @ prompts.t(), truth, classes)
    return out


def scalars(result: dict, prefix: str = "eval_") -> dict[str, float]:
    """The headline numbers, flat, for metrics.jsonl."""
    out = {}
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for k in ("r1", "r5", "r10", "chance_r1", "median_rank"):
            out[f"{prefix}{short}_{k}"] = result[direction][k]
    for key, value in result.items():
        if key.startswith("classify_"):
            out[f"{prefix}{key}_acc"] = value["accuracy"]
            out[f"{prefix}{key}_chance"] = value["chance"]
    return out


def format_report(result: dict) -> str:
    lines = [f"{result['samples']} samples, {result['distinct_captions']} distinct captions (a hit: same 8 clauses)",
             f"{'retrieval':<14} {'R@1':>14} {'R@5':>14} {'R@10':>14} {'median rank':>16}"]
    for direction in ("image_to_text", "text_to_image"):
        r = result[direction]
        cells = [f"{r[f'r{k}']:.3f} ({r[f'chance_r{k}']:.3f})" for k in (1, 5, 10)]
        lines.append(f"{direction:<14} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} "
                     f"{r['median_rank']:>7.0f} ({r['chance_median_rank']:.0f})")
    lines.append("(chance in brackets)")
    for key, c in result.items():
        if key.startswith("classify_"):
            lines.append(f"{key[9:]:<14} accuracy {c['accuracy']:.3f} (chance {c['chance']:.3f}, majority "
                         f"{c['majority']:.3f}) over {len(c['classes'])} classes")
            for name, rec in c["recall"].items():
                lines.append(f"  {name[:60]:<60} recall {rec if rec is None else f'{rec:.3f}'}")
    return "\n".join(lines)

"""Zero-shot retrieval and classification metrics, each with the chance level beside it.

Retrieval: a hit is any candidate whose caption has the same eight clauses as the query's (templated captions
repeat, so an image usually has several correct captions). Classification: an image's class for a field (e.g.
water) is the keywords of that clause; prompts are the clause texts of every class.
"""

from __future__ import annotations

import math

import torch

RECALL_AT = (1, 5, 10)


def first_hit_ranks(sim: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-ranked relevant candidate per query. sim, relevant: (queries, candidates)."""
    order = sim.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)
    if not bool(hits.any(1).all()):
        raise ValueError("every query needs at least one relevant candidate")
    return hits.float().argmax(dim=1) + 1


def chance_recall(num_candidates: int, num_relevant: torch.Tensor, k: int) -> float:
    """Mean probability that a random order puts a relevant candidate in the top k: 1 - C(N-m, k) / C(N, k)."""
    n, k = num_candidates, min(k, num_candidates)
    miss = [math.comb(n - int(m), k) / math.comb(n, k) for m in num_relevant.tolist()]
    return 1.0 - sum(miss) / len(miss)


def retrieval_metrics(sim: torch.Tensor, relevant: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 and median rank of the first hit, and the same for a random order (chance_*)."""
    ranks = first_hit_ranks(sim, relevant)
    num_relevant = relevant.sum(1)
    out = {}
    for k in RECALL_AT:
        out[f"r{k}"] = round(float((ranks <= k).float().mean()), 4)
        out[f"chance_r{k}"] = round(chance_recall(sim.shape[1], num_relevant, k), 4)
    out["median_rank"] = float(ranks.float().median())
    # a random order puts the first of m relevant among N at expected rank (N + 1) / (m + 1)
    out["chance_median_rank"] = round(float(((sim.shape[1] + 1) / (num_relevant.float() + 1)).median()), 2)
    return out


def classification_metrics(scores: torch.Tensor, truth: torch.Tensor, classes: list[str]) -> dict:
    """scores: (images, classes); truth: (images,) class index. Accuracy, per-class recall, confusion matrix
    (rows: truth, columns: prediction), chance (uniform guess) and the majority-class baseline."""
    pred = scores.argmax(dim=1)
    n = len(classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
    support = confusion.sum(1)
    recall = {c: (round(float(confusion[i, i] / support[i]), 4) if support[i] else None) for i, c in enumerate(classes)}
    return {"accuracy": round(float((pred == truth).float().mean()), 4), "chance": round(1.0 / n, 4),
            "majority": round(float(support.max() / support.sum()), 4), "classes": classes,
            "recall": recall, "confusion": confusion.tolist()}

"""Zero-shot evaluation: metrics on hand-built similarity matrices (expected values worked out by hand), the
`knowlip eval` command on an export and a run, over 2 gloo ranks equal to 1, and evaluation during training."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import make_config
from knowlip.eval.metrics import chance_recall, classification_metrics, first_hit_ranks, retrieval_metrics
from knowlip.launch.local import spawn_local_ranks


def test_first_hit_rank_counts_any_relevant_candidate():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3],   # order 0,2,3,1: relevant {1, 3} -> first hit at rank 3
                        [0.2, 0.8, 0.1, 0.7],   # order 1,3,0,2: relevant {1} -> rank 1
                        [0.4, 0.3, 0.2, 0.1],   # order 0,1,2,3: relevant {2} -> rank 3
                        [0.1, 0.2, 0.3, 0.4]])  # order 3,2,1,0: relevant {0} -> rank 4
    relevant = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert first_hit_ranks(sim, relevant).tolist() == [3, 1, 3, 4]
    m = retrieval_metrics(sim, relevant)
    assert (m["r1"], m["r5"], m["median_rank"]) == (0.25, 1.0, 3.0)
    # chance: N=4; m=2 -> R@1 1/2, m=1 -> 1/4 (three queries): (0.5 + 0.75) / 4
    assert m["chance_r1"] == pytest.approx((0.5 + 3 * 0.25) / 4, abs=1e-4)
    # expected first-hit rank at random: (N+1)/(m+1) = 5/3 for m=2, 5/2 for m=1; median of [5/3, 2.5, 2.5, 2.5]
    assert m["chance_median_rank"] == 2.5
    with pytest.raises(ValueError, match="at least one relevant"):
        first_hit_ranks(sim, torch.zeros(4, 4, dtype=torch.bool))


def test_recall_at_k_stops_at_rank_k():
    """First hits exactly at k and at k + 1 for every k: R@k counts the first, never the second."""
    ranks = [1, 2, 5, 6, 10, 11]
    sim = torch.arange(12, 0, -1, dtype=torch.float32).repeat(len(ranks), 1)  # every row ranks 0, 1, 2, ...
    relevant = torch.zeros(len(ranks), 12, dtype=torch.bool)
    relevant[torch.arange(len(ranks)), torch.tensor(ranks) - 1] = True
    assert first_hit_ranks(sim, relevant).tolist() == ranks
    m = retrieval_metrics(sim, relevant)
    assert (m["r1"], m["r5"], m["r10"]) == (round(1 / 6, 4), round(3 / 6, 4), round(5 / 6, 4))


def test_chance_recall_by_combinatorics():
    assert chance_recall(10, torch.tensor([1]), 5) == pytest.approx(0.5)
    assert chance_recall(10, torch.tensor([2]), 1) == pytest.approx(0.2)
    assert chance_recall(10, torch.tensor([2]), 5) == pytest.approx(1 - (5 * 4) / (10 * 9))  # 1 - C(8,5)/C(10,5)
    assert chance_recall(3, torch.tensor([1]), 10) == 1.0


def test_clause_values_group_by_their_head_words():
    from knowlip.eval.zero_shot import class_of

    assert class_of("a lake in the north-west covering about 12 percent") == "a lake in the north-west"
    assert class_of("a river flowing east-west covering about 7 percent") == "a river flowing east-west"
    assert class_of("no water") == "no water" and class_of("12 percent") == "12 percent"
    assert class_of("two roads crossing north-south and east-west") == "two roads crossing north-south and east-west"


def test_classification_accuracy_recall_and_confusion():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.1, 0.8, 0.1]])
    truth = torch.tensor([0, 1, 1, 2, 1])
    m = classification_metrics(scores, truth, ["a", "b", "c"])
    assert m["accuracy"] == 0.8 and m["chance"] == pytest.approx(1 / 3, abs=1e-4) and m["majority"] == 0.6
    assert m["recall"] == {"a": 1.0, "b": pytest.approx(2 / 3, abs=1e-4), "c": 1.0}
    assert m["confusion"] == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]


@pytest.fixture(scope="module")
def trained(synth_shards, tiny_in_process_base, tmp_path_factory):
    """A tiny model trained a few steps in process (plain engine) and exported."""
    from knowlip.train.export import export_checkpoint
    from knowlip.train.trainer import Trainer

    run = tmp_path_factory.mktemp("evalrun")
    cfg = make_config(run, *tiny_in_process_base, "train.steps=6", "train.log_every=2", f"eval.shards={synth_shards}",
                      "eval.every=3", "eval.batch_size=20")
    Trainer(cfg).train()
    export_checkpoint(run, run / "export")
    return run


def test_training_evaluates_every_n_steps_into_metrics(trained):
    rows = {r["step"]: r for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [2, 3, 4, 6]  # 3 and 6: evaluations (6 also a log step)
    for step in (3, 6):
        r = rows[step]
        assert 0 <= r["eval_i2t_r1"] <= r["eval_i2t_r5"] <= r["eval_i2t_r10"] <= 1
        assert 0 < r["eval_i2t_chance_r1"] < 1 and "eval_classify_water_acc" in r
    assert "eval_i2t_r1" not in rows[2]


def _eval_cli(source, shards, out, nproc=None):
    cmd = [sys.executable, "-m", "knowlip.cli", "eval", str(source), "--shards", str(shards), "--json", str(out),
           "--batch-size", "16"]
    if nproc is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout
    assert spawn_local_ranks(nproc, cmd) == 0
    return None


@pytest.mark.integration
def test_eval_cli_on_an_export_equals_the_checkpoint_and_two_ranks_equal_one(trained, synth_shards, tmp_path):
    shown = _eval_cli(trained / "export", synth_shards, tmp_path / "export.json")
    assert "image_to_text" in shown and "(chance in brackets)" in shown and "water" in shown
    _eval_cli(trained, synth_shards, tmp_path / "run.json")
    _eval_cli(trained, synth_shards, tmp_path / "two.json", nproc=2)
    one, run, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("export", "run", "two"))
    assert one == run
    assert one["samples"] == two["samples"] == 96 and one["distinct_captions"] == two["distinct_captions"]
    for direction in ("image_to_text", "text_to_image"):
        assert two[direction] == pytest.approx(one[direction], abs=1e-6)
    assert two["classify_water"]["confusion"] == one["classify_water"]["confusion"]
    # water's values carry a percentage: its classes are their head words, fewer than the values
    from knowlip.text.caption import parse_caption

    captions = (synth_shards.parent / "scenes" / "captions.jsonl").read_text().splitlines()
    waters = {parse_caption(json.loads(line)["caption"]).clauses["water"] for line in captions}
    classes = one["classify_water"]["classes"]
    assert all(not any(ch.isdigit() for ch in c) for c in classes) and 1 < len(classes) < len(waters), (classes, waters)

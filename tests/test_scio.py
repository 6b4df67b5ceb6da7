"""SCIO mechanics on `tiny` with fixed seeds: screening choices, the decoder's one-token shift, variants and
clause positions, phase boundaries, what the model trains on in phases 2 and 3, and a resume inside phase 2."""

import json

import pytest
import torch

from helpers import make_config, straight_and_resumed
from knowlip.model.scio import choose_variants, repair_ids
from knowlip.text.caption import FIELDS, make_caption
from knowlip.text.tokenizer import CaptionTokenizer, train_wordpiece, load_tokenizer
from knowlip.train import scio_loop as scio

CLAUSES = {"terrain": "a vegetated lowland", "functionality": "natural vegetation", "distribution": "vegetation in "
           "the north", "layout": "scattered settlements", "boundary": "gradual transitions", "buildings":
           "no buildings", "roads": "one road crossing north-south", "water": "no water"}


def test_a_clause_is_flagged_only_when_removing_it_raises_both_scores():
    sim_orig, match_orig = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.6, 0.6, 0.6])
    sim_var = torch.tensor([[0.6, 0.7, 0.4], [0.4, 0.5, 0.45], [0.9, 0.55, 0.1]])
    match_var = torch.tensor([[0.7, 0.65, 0.9], [0.9, 0.7, 0.5], [0.5, 0.7, 0.9]])
    valid = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    choice, gain, flagged = choose_variants(sim_orig, sim_var, match_orig, match_var, valid)
    # row 0: variants 0 (+0.1, +0.1) and 1 (+0.2, +0.05) both flagged, 1 has the larger total gain
    # row 1: no variant raises both; row 2: variant 0 would win but is invalid, variant 1 (+0.05, +0.1) is chosen
    assert flagged.tolist() == [[True, True, False], [False, False, False], [False, True, False]]
    assert choice.tolist() == [1, -1, 1]
    assert gain.tolist() == pytest.approx([0.25, 0.0, 0.15])


def test_repair_writes_the_argmax_of_the_previous_position():
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    positions = torch.tensor([[False, False, True, True, False]])
    logits = torch.zeros(1, 5, 50)
    for t, token in enumerate([20, 21, 22, 23, 24]):  # logits at t predict token t + 1
        logits[0, t, token] = 1.0
    assert repair_ids(ids, positions, logits).tolist() == [[2, 10, 21, 22, 3]]


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    caption = make_caption(CLAUSES).text()
    folder = train_wordpiece([caption] * 3, tmp_path_factory.mktemp("tok") / "tok", 200)
    return CaptionTokenizer(load_tokenizer(folder), 96)


def test_variants_drop_one_clause_each_and_field_masks_cover_its_keywords(text_tokenizer):
    caption = make_caption(CLAUSES).text()
    batch, texts = scio.prepare([caption, "free text that is no structured caption"], text_tokenizer, 2)
    assert batch.variant_ids.shape[:2] == (2, 8) and batch.valid[0].all() and not batch.valid[1].any()
    for k, field in enumerate(FIELDS):
        assert CLAUSES[field] not in texts[0][k]
        assert all(CLAUSES[f] in texts[0][k] for f in FIELDS if f != field)
        ids = text_tokenizer([caption])["input_ids"][0]
        clause_tokens = ids[batch.field_masks[0, k]]
        assert text_tokenizer.tok.decode(clause_tokens).replace(" ", "") == CLAUSES[field].replace(" ", "")
    assert not batch.field_masks[1].any() and texts[1] == ["free text that is no structured caption"] * 8


def test_phases_switch_at_the_configured_fractions(tmp_path):
    cfg = make_config(tmp_path, "train.steps=30", "scio.phase_starts=[0.2,0.5]")
    assert [scio.phase_at(s, cfg) for s in (0, 5, 6, 14, 15, 29)] == [1, 1, 2, 2, 3, 3]
    off = make_config(tmp_path, "train.steps=30", "scio.enabled=false")
    assert {scio.phase_at(s, off) for s in range(30)} == {1}
    with pytest.raises(Exception, match="phase_starts"):
        make_config(tmp_path, "scio.phase_starts=[0.6,0.3]")


def test_phase_2_reconstructs_the_filtered_caption_and_phase_3_repairs_only_the_flagged_clause(text_tokenizer,
                                                                                             monkeypatch):
    import knowlip.model.sar_knowlip as sk
    from knowlip.model.dims import preset
    from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens

    tok = text_tokenizer.tok
    torch.manual_seed(0)
    model = SarKnowLIP(preset("tiny", image_size=32, queue_size=8), len(tok), SpecialTokens.from_tokenizer(tok))
    caption = make_caption(CLAUSES).text()
    enc = text_tokenizer([caption, caption], [make_caption(CLAUSES).keyword_spans()] * 2)
    images = torch.rand(2, 1, 32, 32)
    forced = torch.tensor([6, -1])  # sample 0: the roads clause is noise; sample 1: keep
    monkeypatch.setattr(sk, "choose_variants", lambda *a: (forced, torch.tensor([0.1, 0.0]),
                                                           torch.zeros(2, 8, dtype=torch.bool)))
    seen = {}
    real = model._reconstruction
    monkeypatch.setattr(model, "_reconstruction", lambda e, ids, att, kw: seen.update(ids=ids, kw=kw) or real(e, ids, att, kw))
    ids, att, kw = enc["input_ids"], enc["attention_mask"], enc["keyword_mask"]

    batch2, _ = scio.prepare([caption, caption], text_tokenizer, 2)
    out = model(images, ids, att, kw, scio=batch2)
    assert torch.equal(seen["ids"][0], batch2.variant_ids[0, 6]) and torch.equal(seen["ids"][1], ids[1])
    assert out["scio"]["choice"].tolist() == [6, -1]

    batch3, _ = scio.prepare([caption, caption], text_tokenizer, 3)
    out = model(images, ids, att, kw, scio=batch3)
    repaired = out["scio"]["repaired"]
    changed = repaired != ids
    assert changed[0].any() and not changed[1].any()
    assert not (changed[0] & ~batch3.field_masks[0, 6]).any()  # only the flagged clause's keyword tokens
    assert torch.equal(seen["ids"], repaired)  # all three losses train on the repaired caption


def test_a_resume_inside_phase_2_reproduces_the_same_filtered_captions(tiny_in_process_base, tmp_path):
    from knowlip.train.trainer import Trainer

    overrides = [*tiny_in_process_base, "data.max_text_len=96", "train.steps=6", "scio.phase_starts=[0.2,0.9]",
                 "scio.samples_every=1", "scio.samples_per_write=8"]
    straight_and_resumed(lambda run: Trainer(make_config(tmp_path / run, *overrides)), stop_at=3)
    straight, resumed = ((tmp_path / d / "scio_samples.jsonl").read_text() for d in "ab")
    assert resumed == straight
    records = [json.loads(line) for line in straight.splitlines()]
    assert {r["phase"] for r in records} == {2, 3} and min(r["step"] for r in records) == 2
    assert any(r["flagged"] for r in records if r["step"] > 3)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["scio_phase"] == 3

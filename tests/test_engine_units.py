"""Fast checks of the engine's pieces: schedules, clipping in the plain engine, the DeepSpeed config, where a
process sits in a job, and the checkpoint folder's bookkeeping. Expected values are computed by hand here."""

import json
import math

import pytest
import torch

from helpers import REPO, make_config
from knowlip.config import ConfigError, accumulation_steps, config_hash, load_config
from knowlip.launch.local import first_slurm_host, rank_env
from knowlip.train import checkpoint as ckpt
from knowlip.train.engine import PlainEngine, deepspeed_config
from knowlip.train.schedule import alpha_at, lr_at


def test_lr_warms_up_from_the_first_step_then_follows_a_cosine_to_zero():
    values = [lr_at(s, 1e-3, 4, 14) for s in range(15)]
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # step 0 trains: never lr 0
    assert values[4] == pytest.approx(1e-3)
    assert values[9] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # 5 of 10 decay steps
    assert values[14] == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 1e-3, 0, 10) == pytest.approx(1e-3)


def test_lr_decays_to_min_lr_not_below(tmp_path):
    """train.min_lr: BLIP's cosine floors at its min_lr; warmup is unchanged."""
    values = [lr_at(s, 1e-3, 4, 14, min_lr=1e-5) for s in range(15)]
    assert values[:5] == pytest.approx([lr_at(s, 1e-3, 4, 14) for s in range(5)])
    assert values[9] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # halfway through the decay: the midpoint
    assert values[14] == pytest.approx(1e-5) and min(values) == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="train.min_lr: 0.001 is above train.lr=0.0003"):
        make_config(tmp_path, "train.min_lr=0.001")


def test_alpha_ramps_linearly_from_exactly_zero_as_blip():
    """BLIP's pretrain.py: alpha * min(1, i / ramp), i from 0: the first step has no distillation."""
    assert [alpha_at(s, 0.4, 4) for s in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert alpha_at(0, 0.4, 4) == 0.0
    assert alpha_at(0, 0.4, 0) == 0.4


class _Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((10, 10), 3.0))

    def momentum_pairs(self):  # no momentum encoder
        return iter(())


def test_plain_engine_clips_the_gradient_adam_receives(tmp_path):
    """After one AdamW step exp_avg = (1 - beta1) g: its norm shows the gradient after clipping."""
    for clip, expected in ((0.5, 0.5), (0.0, 60.0)):  # d/dw sum(w^2) = 2w = 6 everywhere; norm 6 x 10
        cfg = make_config(tmp_path, f"train.grad_clip={clip}", "train.weight_decay=0")
        engine = PlainEngine(_Quadratic(), cfg, torch.device("cpu"), bf16=False)
        engine.backward((engine.module.w ** 2).sum())
        raw = engine.step()
        exp_avg = engine.optimizer.state[engine.module.w]["exp_avg"]
        assert raw == pytest.approx(60.0)
        assert exp_avg.norm().item() / (1 - 0.9) == pytest.approx(expected, rel=1e-5)


def test_plain_engine_does_not_apply_nonfinite_gradients(tmp_path):
    from knowlip.train.faults import poison_gradients

    engine = PlainEngine(_Quadratic(), make_config(tmp_path), torch.device("cpu"), bf16=False)
    before = engine.module.w.detach().clone()
    loss = poison_gradients((engine.module.w ** 2).sum())
    assert torch.isfinite(loss)
    engine.backward(loss)
    assert math.isnan(engine.step())
    assert torch.equal(engine.module.w, before) and engine.module.w.grad is None and not engine.optimizer.state
    engine.backward((engine.module.w ** 2).sum())  # the next step applies as usual
    assert engine.step() == pytest.approx(60.0) and not torch.equal(engine.module.w, before)


def test_deepspeed_config_sets_clipping_explicitly_and_derives_batch_sizes(tmp_path):
    cfg = make_config(tmp_path, "data.batch_size=4", "train.global_batch_size=32", "train.zero_stage=3",
                      "deepspeed.zero_optimization.reduce_bucket_size=1000")
    ds = deepspeed_config(cfg, world_size=2, accumulation=accumulation_steps(cfg, 2), bf16=False, universal=False)
    assert ds["gradient_clipping"] == 0.0  # present and off: DeepSpeed's own default would be 1.0
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 4, 32)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1000}
    clipped = make_config(tmp_path, "train.grad_clip=0.7", "train.zero_stage=3")
    assert deepspeed_config(clipped, 1, 1, False, False)["gradient_clipping"] == 0.7
    stage2 = make_config(tmp_path, "train.zero_stage=2", "deepspeed.zero_optimization.stage=2")
    assert deepspeed_config(stage2, 1, 1, False, False)["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    no_overlap = make_config(tmp_path, "train.zero_stage=2", "deepspeed.zero_optimization.overlap_comm=false")
    assert deepspeed_config(no_overlap, 1, 1, False, False)["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("override,match", [("deepspeed.gradient_clipping=1.0", "set by knowlip"),
                                            ("deepspeed.train_batch_size=64", "set by knowlip"),
                                            ("deepspeed.zero_optimization.stage=2",
                                             "stage=2 contradicts train.zero_stage=auto")])
def test_deepspeed_section_cannot_contradict_knowlip(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        deepspeed_config(make_config(tmp_path, override), 1, 1, False, False)


def test_zero_stage_is_auto_1_2_or_3(tmp_path):
    with pytest.raises(ConfigError, match="'train.zero_stage': 4 must be auto, 1, 2 or 3"):
        make_config(tmp_path, "train.zero_stage=4")


def test_global_batch_must_split_over_the_ranks(tmp_path):
    cfg = make_config(tmp_path, "data.batch_size=4", "train.global_batch_size=24")
    assert accumulation_steps(cfg, 1) == 6 and accumulation_steps(cfg, 3) == 2
    with pytest.raises(ConfigError, match="cannot be split over 4 rank"):
        accumulation_steps(cfg, 4)
    with pytest.raises(ConfigError, match="not a multiple of data.batch_size"):
        make_config(tmp_path, "data.batch_size=4", "train.global_batch_size=10")


def test_config_hash_ignores_how_a_run_is_stopped_and_resumed(tmp_path):
    a = make_config(tmp_path)
    assert config_hash(a) == config_hash(make_config(tmp_path, "train.stop_at=3", "resume=none",
                                                     "dist.nproc_per_node=4"))
    assert config_hash(a) != config_hash(make_config(tmp_path, "train.lr=0.1"))


def test_rank_environment_from_torchrun_slurm_or_nothing():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
                "MASTER_PORT": "1234"}
    assert rank_env(torchrun) == rank_env(torchrun).__class__(3, 8, 1, 2, "n1", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env = rank_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr) == (5, 8, 1, 4, "gpu07")
    assert env.master_port == rank_env({**slurm, "SLURM_PROCID": "0"}).master_port  # all tasks agree
    assert rank_env({}) is None
    assert first_slurm_host("node1,node2") == "node1" and first_slurm_host("a[3,5-7]") == "a3"


def _fake_checkpoint(root, step, complete=True):
    partial = ckpt.begin_save(root, step)
    (partial / "engine").mkdir()
    (partial / "engine" / "x.pt").write_bytes(b"0" * 100)
    return ckpt.commit_save(partial, {"step": step, "world_size": 2, "engine": "deepspeed"}, keep=2) if complete \
        else partial


def test_checkpoints_publish_atomically_keep_the_newest_and_skip_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_checkpoint(root, step)
    _fake_checkpoint(root, 8, complete=False)  # a save killed half way
    names = {c.path.name: c.complete for c in ckpt.list_checkpoints(root)}
    assert names == {"step_00000004": True, "step_00000006": True, "step_00000008.partial": False}
    assert ckpt.latest_complete(root).name == "step_00000006"
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_00000006"  # a run folder means its newest
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.resolve_checkpoint(root / "step_00000008.partial")
    cfg = load_config(None, [f"run_dir={tmp_path}", "resume=none"])
    assert ckpt.resume_path(cfg) is None
    assert ckpt.resume_path(load_config(None, [f"run_dir={tmp_path}"])).name == "step_00000006"
    _fake_checkpoint(root, 8)  # the retried save replaces the partial folder
    assert [c.path.name for c in ckpt.list_checkpoints(root)] == ["step_00000006", "step_00000008"]
    assert json.loads((root / "step_00000008/meta.json").read_text())["bytes"] == 100


def test_a_partial_folder_is_never_complete_even_with_a_complete_meta(tmp_path):
    """A save killed between writing meta.json and the rename: the folder still ends in .partial, so the
    previous checkpoint stays the one to resume."""
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    partial = _fake_checkpoint(root, 4, complete=False)
    meta = json.loads((root / "step_00000002/meta.json").read_text())
    (partial / "meta.json").write_text(json.dumps({**meta, "step": 4}))
    assert ckpt.latest_complete(root).name == "step_00000002"
    assert [c.complete for c in ckpt.list_checkpoints(root)] == [True, False]


def test_activation_checkpointing_recomputes_to_the_same_loss_and_gradients():
    from knowlip.model.dims import preset
    from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens

    def step(checkpointed: bool):
        torch.manual_seed(0)
        model = SarKnowLIP(preset("tiny", image_size=32, queue_size=8), 64, SpecialTokens(0, 2, 3, 4, 5, 6))
        model.vision.activation_checkpointing = model.text.activation_checkpointing = checkpointed
        calls = []
        block = model.vision.blocks[0]
        forward = block.forward
        block.forward = lambda *a: (calls.append(1), forward(*a))[1]
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(7, 64, (4, 12), generator=g)
        torch.manual_seed(2)
        out = model(torch.rand(4, 1, 32, 32, generator=g), ids, torch.ones_like(ids), torch.rand(4, 12, generator=g) < 0.3)
        out["loss"].backward()
        return out["loss"].item(), model.vision.blocks[0].fc1.weight.grad.clone(), len(calls)

    (loss_a, grad_a, calls_a), (loss_b, grad_b, calls_b) = step(False), step(True)
    assert calls_b == 2 * calls_a  # recomputed in backward
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-6, rtol=1e-5)


def test_schedule_lengths_are_steps_or_fractions_of_the_run(tmp_path):
    from knowlip.config import schedule_steps

    assert schedule_steps(0.02, 100_000) == 2000 and schedule_steps(5, 100_000) == 5 and schedule_steps(0, 10) == 0
    cfg = make_config(tmp_path, "train.steps=200", "train.warmup_steps=0.05", "train.alpha_ramp_steps=0.5")
    from knowlip.train.trainer import Trainer

    lr, alpha = Trainer.lr_at, Trainer.alpha_at
    fake = type("T", (), {"cfg": cfg})()
    assert lr(fake, 0) == pytest.approx(cfg.train.lr / 10) and lr(fake, 9) == pytest.approx(cfg.train.lr)
    assert alpha(fake, 50) == pytest.approx(cfg.model.losses.alpha / 2)
    base = load_config(REPO / "configs/model/base.yaml", ["train.steps=300000"])
    assert schedule_steps(base.train.warmup_steps, 300_000) == 6000
    with pytest.raises(ConfigError, match="warmup_steps"):
        make_config(tmp_path, "train.warmup_steps=2.5")


def _tiny_bf16_weights(tmp_path, *overrides):
    from knowlip.model.dims import preset
    from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens

    cfg = make_config(tmp_path, "train.precision=bf16_weights", "train.grad_clip=0", "model.queue_size=16",
                      *overrides)
    torch.manual_seed(0)
    model = SarKnowLIP(preset("tiny", image_size=32, queue_size=16, text_dropout=0.0, drop_path=0.0), 64,
                       SpecialTokens(0, 2, 3, 4, 5, 6), attention_backend="reference")
    return PlainEngine(model, cfg, torch.device("cpu"), bf16=True, bf16_weights=True), cfg


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 64, (4, 12), generator=g)
    ids[:, 0] = 2
    return (torch.rand(4, 1, 32, 32, generator=g).bfloat16(), ids, torch.ones(4, 12, dtype=torch.long),
            torch.rand(4, 12, generator=g) < 0.3)


def test_bf16_weights_step_is_adamw_on_float32_masters(tmp_path):
    """The optimiser updates float32 masters from the bf16 gradients, exactly as AdamW on float32 copies
    (computed here independently); the bf16 weights are the masters rounded; the temperature master is clamped."""
    engine, cfg = _tiny_bf16_weights(tmp_path)
    model = engine.module
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    reference = {p: engine.masters[p].clone().requires_grad_(True) for p in trained}
    with torch.no_grad():
        engine.masters[model.temp].fill_(10.0)  # far outside [temp_min, temp_max]
        reference[model.temp].fill_(10.0)
    out = engine.forward(*_batch(), alpha=0.4)
    engine.backward(out["loss"])
    for p in trained:
        reference[p].grad = p.grad.float()
    names = {p: n for n, p in model.named_parameters()}
    is_flat = lambda p: p.dim() < 2 or names[p].endswith(("pos_embed", "cls_token", "temp"))
    decay = [reference[p] for p in trained if not is_flat(p)]
    flat = [reference[p] for p in trained if is_flat(p)]
    adam = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                              {"params": flat, "weight_decay": 0.0}], lr=cfg.train.lr, betas=(0.9, 0.98))
    adam.step()
    engine.step()
    lo, hi = model.loss_cfg.temp_min, model.loss_cfg.temp_max
    for p in trained:
        expected = reference[p].detach()
        if p is model.temp:
            expected = expected.clamp(lo, hi)
        assert torch.equal(engine.masters[p], expected), names[p]
        assert torch.equal(p.detach(), expected.bfloat16()), names[p]
        assert p.grad is None


def test_bf16_weights_momentum_accumulates_in_float32(tmp_path):
    """0.005 x a small weight change is below bf16's resolution: the EMA lives in float32 accumulators."""
    engine, _ = _tiny_bf16_weights(tmp_path)
    pairs = list(engine.module.momentum_pairs())
    with torch.no_grad():
        for p, _ in pairs:
            engine.masters[p].add_(1e-3)  # the online masters moved a little
    before = {pm: engine.momentum.ema32[pm].double() for _, pm in pairs}
    engine.momentum_update()
    for p, pm in pairs:
        expected = 0.995 * before[pm] + 0.005 * engine.masters[p].double()
        torch.testing.assert_close(engine.momentum.ema32[pm].double(), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(pm.detach(), engine.momentum.ema32[pm].bfloat16())
    assert any(not torch.equal(engine.momentum.ema32[pm], before[pm].float()) and torch.equal(pm.detach(), before[pm].bfloat16())
               for _, pm in pairs)  # a change the bf16 weight alone would have lost


def test_bf16_weights_checkpoint_restores_masters_momentum_and_optimizer(tmp_path):
    engine, _ = _tiny_bf16_weights(tmp_path / "a")
    for _ in range(2):
        engine.momentum_update()
        out = engine.forward(*_batch(), alpha=0.4)
        engine.backward(out["loss"])
        engine.step()
    engine.save(tmp_path / "ckpt")
    fresh, _ = _tiny_bf16_weights(tmp_path / "b", "seed=7")
    with torch.no_grad():
        for m in fresh.masters.values():
            m.zero_()
    fresh.load(tmp_path / "ckpt")
    names = dict(fresh.module.named_parameters())
    for name, p in engine.module.named_parameters():
        q = names[name]
        assert torch.equal(p, q), name
        if p in engine.masters:
            assert torch.equal(engine.masters[p], fresh.masters[q]), name
        if p in engine.momentum.ema32:
            assert torch.equal(engine.momentum.ema32[p], fresh.momentum.ema32[q]), name
    a, b = engine.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    autocast_engine = PlainEngine(fresh.module, make_config(tmp_path / "c", "train.precision=bf16"),
                                  torch.device("cpu"), bf16=True)
    autocast_engine.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="written without bf16 weights"):
        fresh.load(tmp_path / "plain")


def _saves(root, *steps, keep=10):
    """Fake checkpoints saved in this order (not step order)."""
    for step in steps:
        partial = _fake_checkpoint(root, step, complete=False)
        ckpt.commit_save(partial, {"step": step, "world_size": 2, "engine": "deepspeed"}, keep=keep)


def test_auto_takes_latest_and_pruning_goes_by_save_order(tmp_path):
    """A run that went back to step 2 saves step 3 after step 6: resume=auto takes step 3 (what `latest` names,
    the newest save), not the highest step; pruning keeps the newest saves, never the save just made."""
    root = tmp_path / "checkpoints"
    _saves(root, 6, 2, 3, keep=2)
    assert [c.path.name for c in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert ckpt.latest_complete(root).name == "step_00000003"
    (root / "latest").unlink()  # without `latest`: the newest by save order, still not the highest step
    _saves(root, 1, keep=5)
    (root / "latest").write_text("step_00000009\n")  # names nothing complete
    assert ckpt.latest_complete(root).name == "step_00000001"


def test_a_rollback_starts_a_branch_and_sets_the_later_saves_aside(tmp_path):
    root = tmp_path / "checkpoints"
    _saves(root, 2, 4, 6)
    cfg = load_config(None, [f"run_dir={tmp_path}", f"resume={root / 'step_00000002'}"])
    plan = ckpt._pick_resume(cfg, 2, [])
    assert plan.path == root / "step_00000002" and not plan.universal
    assert [c.path.name for c in ckpt.list_checkpoints(root)] == ["step_00000002"]
    assert (root / "latest").read_text().strip() == "step_00000002"
    [(folder, note, kept)] = ckpt.abandoned_branches(root)
    assert folder == plan.abandoned and [c.path.name for c in kept] == ["step_00000004", "step_00000006"]
    assert all(c.complete for c in kept) and note["resumed_from"] == str(root / "step_00000002")
    _saves(root, 4)  # the new branch's step 4 does not replace the abandoned one
    assert ckpt._pick_resume(load_config(None, [f"run_dir={tmp_path}"]), 2, []).path == root / "step_00000004"
    assert len(ckpt.abandoned_branches(root)) == 1 and (folder / "step_00000004" / "meta.json").is_file()


def test_auto_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    _saves(root, 2, 4)
    (root / "step_00000004" / "engine" / "x.pt").write_bytes(b"1" * 100)
    plan = ckpt._pick_resume(load_config(None, [f"run_dir={tmp_path}"]), 2, [])
    assert plan.path == root / "step_00000002"
    err = caplog.text
    assert "step_00000004 cannot be resumed" in err and "sha256 does not match" in err and "falling back to step_00000002" in err
    assert [c.path.name for c in ckpt.abandoned_branches(root)[0][2]] == ["step_00000004"]  # kept to inspect
    (root / "step_00000002" / "engine" / "x.pt").write_bytes(b"1" * 100)
    with pytest.raises(ckpt.UntrustedCheckpoint, match="step_00000002"):  # nothing left to fall back to
        ckpt._pick_resume(load_config(None, [f"run_dir={tmp_path}"]), 2, [])
    _saves(root, 6)
    (root / "step_00000006" / "engine" / "x.pt").write_bytes(b"1" * 100)
    with pytest.raises(ckpt.UntrustedCheckpoint):  # an explicit choice never falls back
        ckpt._pick_resume(load_config(None, [f"run_dir={tmp_path}", f"resume={root / 'step_00000006'}"]), 2, [])


def test_resume_none_is_refused_on_a_history_and_restart_sets_it_aside(tmp_path):
    root, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 5}\n')
    none = load_config(None, [f"run_dir={tmp_path}", "resume=none"])
    with pytest.raises(ValueError, match="resume=none, but this run already has a history.*resume=restart"):
        ckpt._pick_resume(none, 2, [metrics])
    _saves(root, 5)
    metrics.unlink()
    with pytest.raises(ValueError, match="already has a history"):
        ckpt._pick_resume(none, 2, [metrics])
    metrics.write_text('{"step": 5}\n')
    plan = ckpt._pick_resume(load_config(None, [f"run_dir={tmp_path}", "resume=restart"]), 2, [metrics])
    assert plan.path is None and not metrics.exists() and ckpt.list_checkpoints(root) == []
    [(folder, note, kept)] = ckpt.abandoned_branches(root)
    assert note["reason"] == "resume=restart" and (folder / "metrics.jsonl").read_text() == '{"step": 5}\n'
    assert [c.path.name for c in kept] == ["step_00000005"]
    assert ckpt._pick_resume(none, 2, [metrics]).path is None  # the folder is fresh again


# -- train.zero_stage=auto -----------------------------------------------------------------------------------


def test_auto_takes_the_lowest_stage_that_fits_by_hand_computed_states():
    """P = 1e9 trainable, Q = 0, 8 ranks: states 5.5e9 B (ZeRO-1: 2P + 2P + 12P/8), 3.75e9 (ZeRO-2: 2P + 14P/8),
    2e9 (ZeRO-3: 16P/8). Usable: 90% of the device less 1 GiB."""
    from knowlip.train.memory_model import GIB, choose_zero_stage

    p = 10**9
    usable = lambda device_gib: 0.9 * device_gib * GIB - GIB
    cases = [  # (device GiB, activations B) -> stage, by the numbers above
        (80, 10 * GIB, 1),  # 5.5e9 + 10 GiB < 71 GiB
        (10, 3 * GIB, 2),  # ZeRO-1: 5.5e9 + 3 GiB = 8.12 GiB > 8 GiB usable; ZeRO-2: 6.49 GiB fits
        (10, 5.5 * GIB, 3),  # ZeRO-2: 8.99 GiB > 8; ZeRO-3: 7.36 GiB fits
        (10, 7 * GIB, 3),  # nothing fits: ZeRO-3, fits=False
    ]
    for device_gib, activations, expected in cases:
        choice = choose_zero_stage(p, 0, activations, device_gib * GIB, 8)
        assert choice.stage == expected, (device_gib, activations, choice)
        needs = {1: 5.5e9, 2: 3.75e9, 3: 2e9}[expected] + activations
        assert choice.fits == (needs <= usable(device_gib)), choice
    assert "lower data.batch_size" in choose_zero_stage(p, 0, 7 * GIB, 10 * GIB, 8).reason


def test_auto_on_the_model_sizes_and_gpus_of_a_table(tmp_path, monkeypatch):
    """zero_stage_for on real model sizes with a GPU's memory (mocked: no GPU here; only total_memory is read).
    The activation estimate is calibrated on base at 224 px, 128 tokens, batch 128 = 61.5 GiB."""
    from knowlip.model.dims import preset
    from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens
    from knowlip.train import memory_model as mm

    assert mm.activation_bytes(preset("base"), 224, 128, 128) == pytest.approx(61.5 * mm.GIB)
    with torch.device("meta"):
        base = SarKnowLIP(preset("base"), 30524, SpecialTokens(0, 2, 3, 4, 5, 6))
    gpu = {"gib": 80}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"total_memory": gpu["gib"] * mm.GIB})())
    cuda = torch.device("cuda", 0)
    p = sum(t.numel() for t in base.parameters() if t.requires_grad)
    q = sum(t.numel() for t in base.parameters() if not t.requires_grad)

    def by_hand(gib: float, batch: int, n: int) -> tuple[int, bool]:
        usable, activations = 0.9 * gib * 2**30 - 2**30, batch * 61.5 * 2**30 / 128
        # ZeRO-3 gathering a block at a time (the default) holds whole bf16 gradients (2P) and the weights its
        # linear layers keep for backward (2P) too, and gathers a momentum tower whole (2Q); a module at a time, none
        states = {(1, None): 4 * p + 2 * q + 12 * p / n, (2, None): 2 * p + 2 * q + 14 * p / n,
                  (3, None): (16 * p + 2 * q) / n + 4 * p + 2 * q, (3, "module"): (16 * p + 2 * q) / n}
        fitting = [option for option, need in states.items() if need + activations <= usable]
        return (*fitting[0], True) if fitting else (3, "module", False)

    table = [(80, 128, 8), (16, 24, 8), (16, 25, 8), (20, 33, 8), (16, 26, 8), (24, 40, 1), (24, 34, 8)]
    seen = {}
    for gib, batch, ranks in table:
        gpu["gib"] = gib
        cfg = make_config(tmp_path, "model.size=base", "model.image_size=224", "data.max_text_len=128",
                          f"data.batch_size={batch}", "train.precision=bf16")
        choice = mm.zero_stage_for(cfg, base, cuda, ranks)
        got = (choice.stage, choice.gather, choice.fits)
        assert got == by_hand(gib, batch, ranks), (gib, batch, ranks, choice.reason)
        seen[got] = choice.reason
    # the table reaches every outcome (ZeRO-3 gathering a block at a time never fits where ZeRO-2 does not:
    # its whole gradients cost more than the partitioned weights save)
    assert set(seen) == {(1, None, True), (2, None, True), (3, "module", True), (3, "module", False)}
    assert "gathering a module at a time (train.zero3_gather=module" in seen[3, "module", True]
    assert mm.zero_stage_for(make_config(tmp_path), base, torch.device("cpu"), 2).stage == 3  # CPU: the design's
    assert mm.zero_stage_for(make_config(tmp_path, "train.zero_stage=2"), base, cuda, 8).reason == \
        "set by train.zero_stage"


def test_auto_keeps_the_stage_a_resumed_run_was_saved_at(tmp_path):
    from knowlip.train import checkpoint as ckpt
    from knowlip.train.memory_model import zero_stage_for

    cfg = make_config(tmp_path)
    partial = ckpt.begin_save(ckpt.checkpoint_root(cfg), 4)
    ckpt.commit_save(partial, {"step": 4, "world_size": 2, "engine": "deepspeed", "zero_stage": 2}, keep=3)
    choice = zero_stage_for(cfg, None, torch.device("cpu"), 2)
    assert (choice.stage, choice.reason) == (2, "the stage step_00000004 was saved at (a run keeps its stage)")
    assert zero_stage_for(make_config(tmp_path, "resume=restart"), None, torch.device("cpu"), 2).stage == 3


def _tiny_model():
    from knowlip.model.dims import preset
    from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens

    torch.manual_seed(0)
    return SarKnowLIP(preset("tiny", image_size=32, queue_size=8), 64, SpecialTokens(0, 2, 3, 4, 5, 6)).eval()


def _tiny_loss(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 64, (4, 12), generator=g)
    torch.manual_seed(2)  # the ITM negatives are drawn
    return model(torch.rand(4, 1, 32, 32, generator=g), ids, torch.ones_like(ids), torch.rand(4, 12, generator=g) < 0.3)["loss"]


def test_flat_layout_trains_the_same_weights_under_other_names_and_maps_them_back():
    """train.zero3_gather=flat: every block's weights as views of a few flat parameters. Against the model as it
    was: the same loss and gradients, the same optimiser groups, the momentum copies still paired, and the
    original names back from unflatten (momentum.pt and exports keep them)."""
    from knowlip.train.engine import param_groups
    from knowlip.train.param_layout import FlatLayout

    plain, flat = _tiny_model(), _tiny_model()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    layout = FlatLayout.of(flat)
    layout.apply(flat)
    names = dict(flat.named_parameters())
    assert len(names) < len(dict(plain.named_parameters())) / 2
    assert "vision.blocks.0.flat_decay" in names and "text.layers.0.flat_fusion_no_decay" in names
    assert "vision.blocks.0.fc1.weight" not in names and "text_m.layers.0.flat_fusion_decay" not in names
    after = flat.state_dict()
    assert_equal_state(layout.unflatten(after), before)
    assert_equal_state(layout.flatten(before), after)

    loss_plain, loss_flat = _tiny_loss(plain), _tiny_loss(flat)
    assert loss_flat.item() == loss_plain.item()
    loss_plain.backward()
    loss_flat.backward()
    grads = layout.unflatten({n: p.grad for n, p in flat.named_parameters() if p.grad is not None})
    assert_equal_state(grads, {n: p.grad for n, p in plain.named_parameters() if p.grad is not None})

    sizes = lambda model: [sum(p.numel() for p in g["params"]) for g in param_groups(model, 0.05)]
    assert sizes(flat) == sizes(plain)  # what decays and what does not
    assert all(p.shape == pm.shape and not pm.requires_grad for p, pm in flat.momentum_pairs())
    assert sum(p.numel() for p, _ in flat.momentum_pairs()) == sum(p.numel() for p, _ in plain.momentum_pairs())


def assert_equal_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_flat_layout_rebinds_its_views_to_the_data_zero3_swaps_in_before_each_call():
    from knowlip.train.param_layout import FlatLayout

    model = _tiny_model()
    layout = FlatLayout.of(model)
    layout.apply(model)
    layout.bind_before_each_call(model)
    block = model.vision.blocks[0]
    qkv = lambda: block.flat_decay.view(-1)[: block.attn.qkv.weight.numel()].view_as(block.attn.qkv.weight)
    assert torch.equal(block.attn.qkv.weight, qkv())
    block.flat_decay.data = block.flat_decay.data.clone() * 2  # as ZeRO-3 swaps a gathered tensor in
    assert not torch.equal(block.attn.qkv.weight, qkv())  # the views still show the old data
    block(torch.zeros(1, 3, model.dims.vision.dim))
    assert torch.equal(block.attn.qkv.weight, qkv())  # bound to the new data before the call
    with pytest.raises(ValueError, match="text.layers.0.self_attn.key.bias is missing"):
        layout.flatten({"text.layers.0.self_attn.query.bias": torch.zeros(1)})


def test_a_checkpoint_resumes_only_in_the_parameter_layout_it_was_saved_in(tmp_path):
    from knowlip.train.engine import flat_layout

    flat_cfg, block_cfg = make_config(tmp_path, "train.zero3_gather=flat"), make_config(tmp_path)
    for meta, cfg, refusal in (
            ({"param_layout": "flat"}, block_cfg, "saved with train.zero3_gather=flat .*resume with train.zero3_gather=flat"),
            ({"param_layout": "per_parameter"}, flat_cfg, "one parameter per weight, but train.zero3_gather=flat"),
            ({}, flat_cfg, "one parameter per weight"),  # saved before the layout was recorded
    ):
        with pytest.raises(ValueError, match=refusal):
            ckpt._check_param_layout(cfg, tmp_path / "step_00000004", meta, 3)
    ckpt._check_param_layout(flat_cfg, tmp_path, {"param_layout": "flat"}, 3)
    ckpt._check_param_layout(block_cfg, tmp_path, {}, 3)
    ckpt._check_param_layout(flat_cfg, tmp_path, {"param_layout": "per_parameter"}, 2)  # flat is a ZeRO-3 layout
    with pytest.raises(ValueError, match="needs one micro-batch per step, but this job accumulates 2"):
        flat_layout(flat_cfg, 3, 2, _tiny_model())


def test_zero3_gather_auto_is_flat_unless_accumulating_or_resuming_one_weight_per_parameter(tmp_path):
    from knowlip.train.memory_model import zero3_gather_for

    cfg = make_config(tmp_path)
    assert zero3_gather_for(cfg, 1)[0] == "flat" and zero3_gather_for(cfg, 2)[0] == "module"
    assert zero3_gather_for(make_config(tmp_path, "train.zero3_gather=block"), 1) == ("block", "set by train.zero3_gather")
    root = ckpt.checkpoint_root(cfg)
    ckpt.commit_save(ckpt.begin_save(root, 4), {"step": 4, "world_size": 2, "engine": "deepspeed", "zero_stage": 3}, keep=3)
    assert zero3_gather_for(cfg, 1) == ("block", "step_00000004 was saved with one parameter per weight (a run keeps its layout)")
    ckpt.commit_save(ckpt.begin_save(root, 6), {"step": 6, "world_size": 2, "engine": "deepspeed", "zero_stage": 3,
                                                "param_layout": "flat"}, keep=3)
    assert zero3_gather_for(cfg, 1)[0] == "flat"
    assert zero3_gather_for(make_config(tmp_path, "resume=restart"), 1)[0] == "flat"

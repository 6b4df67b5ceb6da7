"""The tiny model trains on synthetic shards (the plain engine, in process, CPU), and the quickstart runs end to
end (DeepSpeed ZeRO-3 on 2 gloo ranks). The ZeRO-3 engine's own tests are in test_engine.py."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from helpers import REPO, assert_same_weights, make_config, straight_and_resumed
from knowlip.train.trainer import Trainer


def test_tiny_model_loss_falls_over_a_few_dozen_cpu_steps(tiny_in_process_base, tmp_path):
    cfg = make_config(tmp_path, *tiny_in_process_base, "data.max_text_len=96", "train.steps=36", "train.lr=1e-3",
                      "train.warmup_steps=3", "train.log_every=6", "train.alpha_ramp_steps=1")
    result = Trainer(cfg).train()
    losses = np.array([h["loss"] for h in result["history"]])
    recon = np.array([h["loss_recon"] for h in result["history"]])
    assert result["steps"] == 36 and np.isfinite(losses).all()
    assert losses[-6:].mean() < losses[:6].mean() - 0.6  # with BLIP's text dropout and momentum ITC columns
    assert recon[-6:].mean() < recon[:6].mean() - 0.5
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12, 18, 24, 30, 36]
    assert all(r["samples_per_s"] > 0 and r["tflops_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    for name in ("model.safetensors", "tokenizer/tokenizer.json", "config.yaml"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.integration
def test_quickstart_script_runs_end_to_end_and_its_model_is_used_as_the_readme_says(tmp_path):
    """The quickstart (paths as the default config's, under tmp_path), then README "Using the trained model" run
    as written from tmp_path: the export command, and the Python snippet whose three similarity matrices
    (knowlip, transformers, the MLflow registry) must agree."""
    venv_knowlip = REPO / ".venv/bin/knowlip"
    if not venv_knowlip.exists():
        pytest.skip("the quickstart runs from .venv (make quickstart creates it)")
    run = tmp_path / "runs" / "quickstart"
    config = tmp_path / "quick.yaml"
    config.write_text(f"""
run_dir: {run}
synth: {{out_dir: {run}/scenes, num_scenes: 3, size: 128}}
pack: {{inputs: [{run}/scenes], out_dir: {run}/shards}}
data: {{shards: {run}/shards, batch_size: 4}}
train: {{steps: 4, log_every: 2, tokenizer_vocab: 300}}
""")
    proc = subprocess.run(["bash", str(REPO / "launch/quickstart.sh")], env={**os.environ, "CONFIG": str(config)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "samples in 1 shards" in proc.stdout and "trained 4 steps" in proc.stdout
    assert (run / "model.safetensors").is_file()
    meta = json.loads((run / "checkpoints/step_00000004/meta.json").read_text())
    assert meta["zero_stage"] == 3 and meta["zero_stage_reason"].startswith("no GPU")  # zero_stage=auto on a CPU
    assert meta["param_layout"] == "flat"  # zero3_gather=auto on a fresh run
    assert "engine deepspeed ZeRO-3 (no GPU: ZeRO-3, the design's engine" in proc.stdout + proc.stderr
    assert "train.zero3_gather=flat (a block at a time, each block's weights in flat parameters)" in proc.stderr
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # SCIO ran: step 3 in phase 2, step 4 in phase 3; the row sums the window of steps 3-4 over 2 ranks x 4 captions
    assert last["scio_phase"] == 3 and last["scio_screened"] == 16
    # tracked with nothing configured: the local MLflow store beside the run folder, and the command to browse it
    assert f"to browse it: knowlip mlflow ui {run}" in proc.stdout
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/runs/mlflow.db")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]
    again = subprocess.run(["bash", str(REPO / "launch/quickstart.sh")], env={**os.environ, "CONFIG": str(config)},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already finished: 4 of 4 steps" in again.stdout and "not packing again" in again.stdout

    section = (REPO / "README.md").read_text().split("### Using the trained model")[1].split("\n### ")[0]
    command = section.split("```bash\n")[1].split("```")[0].strip()
    snippet = section.split("```python\n")[1].split("```")[0]
    exported = subprocess.run(command.replace(".venv/bin/knowlip", str(venv_knowlip)), shell=True, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
    checks = ("\nimport numpy\nassert numpy.allclose(knowlip_sim.numpy(), blip_sim.numpy(), atol=1e-5)\n"
              "assert numpy.allclose(knowlip_sim.numpy(), registry_sim, atol=1e-5)\n")
    used = subprocess.run([str(REPO / ".venv/bin/python"), "-c", snippet + checks], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert used.returncode == 0, used.stdout[-2000:] + used.stderr[-3000:]
    version = client.get_model_version("sar-knowlip", "1")
    assert version.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"  # its run, left finished
    tags = version.tags
    assert tags["knowlip.run_id"] == run_id and tags["knowlip.step"] == "4" and tags["knowlip.git_commit"] != "-"
    from knowlip.data.shards import load_index

    index = load_index(run / "shards")
    assert tags["knowlip.dataset_samples"] == str(index.total_samples)
    assert tags["knowlip.dataset_fingerprint"] == index.fingerprint() and len(tags["knowlip.config_hash"]) == 16


def test_resume_mid_epoch_is_bit_exact(tiny_in_process_base, tmp_path):
    """10 steps straight == 4 steps, a checkpoint, a fresh trainer resuming from it (resume=auto), 6 more."""

    def same_cursor(first, resumed):
        assert resumed.loader.state_dict()["cursor"] == first.loader.state_dict()["cursor"] > 0

    straight, resumed = straight_and_resumed(
        lambda run: Trainer(make_config(tmp_path / run, *tiny_in_process_base, "train.steps=10", "train.log_every=100")),
        stop_at=4, on_resume=same_cursor)
    assert_same_weights(straight.model, resumed.model)


@pytest.mark.parametrize("override,match", [("model.in_channels=2", r"chips have \[1\] channel"),
                                            ("data.batch_size=100000", "fewer than one batch")])
def test_data_that_cannot_feed_the_model_fails_at_start(synth_shards, tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        Trainer(make_config(tmp_path, f"data.shards={synth_shards}", override))


@pytest.mark.parametrize("precision", ["bf16", "bf16_weights"])
def test_bf16_steps_run_on_cpu_and_resume(tiny_in_process_base, tmp_path, precision):
    """The GPU's precision paths (bf16 autocast; bf16 weights with float32 masters), exercised on the CPU:
    stopped at step 2, resumed to 4; the export holds float32 weights (bf16_weights: the masters)."""
    from safetensors.torch import load_file

    overrides = [*tiny_in_process_base, "train.steps=4", f"train.precision={precision}", "norm.out_dtype=bfloat16"]
    assert Trainer(make_config(tmp_path, *overrides)).train(until=2)["stopped"] == "stop_at"
    trainer = Trainer(make_config(tmp_path, *overrides))
    assert trainer.step == 2
    history = trainer.train()["history"]
    assert len(history) == 2 and all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)
    assert trainer.model.image_queue.dtype.is_floating_point and trainer.model.queue_ptr.item() == (4 * 8) % 16
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    if precision == "bf16_weights":
        master = trainer.engine.masters[trainer.model.text_proj.weight]
        assert torch.equal(weights["text_proj.weight"], master)  # not the bf16 weight rounded

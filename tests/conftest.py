"""Shared fixtures. The real Sentinel-1 scenes are found through KNOWLIP_SHARED_DATA (default ../shared/data
beside the repository); in CI (CI=true) a missing folder fails, elsewhere the tests that need it skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knowlip.config import load_config

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("KNOWLIP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def sentinel1_dir(tmp_path_factory) -> Path:
    """A writable copy of the real Sentinel-1 scenes."""
    src = shared_data_dir() / "sentinel1"
    tifs = sorted(src.glob("*.tif")) if src.is_dir() else []
    if not tifs:
        message = f"real Sentinel-1 scenes not found in {src} (set KNOWLIP_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    dst = tmp_path_factory.mktemp("sentinel1")
    for tif in tifs:
        shutil.copy(tif, dst / tif.name)
    return dst


def make_config(tmp: Path, *overrides: str):
    """Defaults rooted in a temporary folder, plus overrides."""
    base = [f"run_dir={tmp}", f"synth.out_dir={tmp}/scenes", f"pack.inputs=[{tmp}/scenes]",
            f"pack.out_dir={tmp}/shards", f"data.shards={tmp}/shards", "mlflow.enabled=false"]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """A small synthetic dataset packed into several uneven shards (shared, read-only for tests)."""
    from knowlip.data.pack import pack
    from knowlip.sar.synth import synthesise_from_config

    tmp = tmp_path_factory.mktemp("synth")
    cfg = make_config(tmp, "synth.num_scenes=6", "synth.size=128", "pack.chip.size=32", "pack.chip.stride=32",
                      "pack.shard_max_samples=23")
    synthesise_from_config(cfg)
    pack(cfg)
    return tmp / "shards"


@pytest.fixture(scope="session")
def tiny_train_base(synth_shards, tmp_path_factory) -> list[str]:
    """Training overrides shared by the multi-process tests: the tiny model on the session's synthetic shards
    (96 chips, 12 global steps of 2 x 4 per epoch), one tokenizer built once."""
    from knowlip.data.shards import load_index
    from knowlip.text.tokenizer import train_wordpiece
    from knowlip.data.loader import shard_captions

    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_wordpiece(shard_captions(load_index(synth_shards)), tok, 300)
    return [f"data.shards={synth_shards}", "data.batch_size=4", "data.max_text_len=48", "model.image_size=32",
            "model.queue_size=16", f"model.tokenizer={tok}", "train.log_every=1", "train.warmup_steps=2",
            "train.steps=8", "train.progress=false", "mlflow.enabled=false"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl, checking that no step repeats or goes back."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def deepspeed_zero_stage(ckpt: Path) -> int:
    """The ZeRO stage DeepSpeed itself recorded in a checkpoint's optimizer files (not knowlip's meta.json):
    the stage a run really trained at."""
    import torch

    optim = next((ckpt / "engine").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    return int(torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]["zero_stage"])


@pytest.fixture(scope="session")
def local_run(tiny_train_base, tmp_path_factory) -> Path:
    """The reference of the Slurm tests: `knowlip train` with 2 local ranks on this host, 16 steps."""
    run = tmp_path_factory.mktemp("local") / "run"
    proc = subprocess.run([sys.executable, "-m", "knowlip.cli", "train", f"run_dir={run}", "dist.nproc_per_node=2",
                           *tiny_train_base, "train.steps=16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def wait_for_steps(run: Path, steps: int, timeout: float = 300) -> float:
    """Until the run logged `steps` steps; returns the deadline, for what follows."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < steps:
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.1)
    return deadline


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    """The job id `knowlip submit` printed (failing with its output when it failed)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.split("submitted job ")[1].split()[0]

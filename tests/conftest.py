"""Shared fixtures. The real Sentinel-1 scenes are found through KNOWLIP_SHARED_DATA (default ../shared/data
beside the repository); in CI (CI=true) a missing folder fails, elsewhere the tests that need it skip."""

from __future__ import annotations

import json
import os
import shutil
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
    from knowlip.train.trainer import shard_captions

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

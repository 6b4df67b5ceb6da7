"""Shared fixtures. The real Sentinel-1 scenes are found through KNOWLIP_SHARED_DATA (default ../shared/data
beside the repository); in CI (CI=true) a missing folder fails, elsewhere the tests that need it skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, make_config


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
def session_tokenizer(synth_shards, tmp_path_factory) -> Path:
    """The WordPiece tokenizer (300 words) a run on the session's shards would train for itself, built once."""
    from knowlip.data.loader import shard_captions
    from knowlip.data.shards import load_index
    from knowlip.text.tokenizer import train_wordpiece

    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_wordpiece(shard_captions(load_index(synth_shards)), tok, 300)
    return tok


@pytest.fixture(scope="session")
def tiny_in_process_base(synth_shards, session_tokenizer) -> list[str]:
    """Overrides of the in-process tiny run on the session's shards (helpers.tiny_in_process)."""
    from helpers import tiny_in_process

    return tiny_in_process(synth_shards, session_tokenizer)


@pytest.fixture(scope="session")
def tiny_train_base(synth_shards, session_tokenizer) -> list[str]:
    """Training overrides shared by the multi-process tests: the tiny model on the session's synthetic shards
    (96 chips, 12 global steps of 2 x 4 per epoch), the session's tokenizer."""
    return [f"data.shards={synth_shards}", "data.batch_size=4", "data.max_text_len=48", "model.image_size=32",
            "model.queue_size=16", f"model.tokenizer={session_tokenizer}", "train.log_every=1", "train.warmup_steps=2",
            "train.steps=8", "train.progress=false", "mlflow.enabled=false"]


@pytest.fixture(scope="session")
def local_run(tiny_train_base, tmp_path_factory) -> Path:
    """The reference of the Slurm tests: `knowlip train` with 2 local ranks on this host, 16 steps."""
    run = tmp_path_factory.mktemp("local") / "run"
    proc = subprocess.run([sys.executable, "-m", "knowlip.cli", "train", f"run_dir={run}", "dist.nproc_per_node=2",
                           *tiny_train_base, "train.steps=16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run



"""Checkpoints are data, not code: a pickle payload planted in any file of a checkpoint never runs when knowlip
resumes, exports, evaluates or converts it.

Two layers are tested apart: (1) every file must match the sha256 its meta.json recorded at save, so a changed
file is refused by name before anything opens it; (2) knowlip's own files (state.pt, momentum.pt, RNG, the plain
engine's file) are read with weights_only=True, so a payload does not run even when meta.json was rewritten to
match it. DeepSpeed's own shards rely on layer 1 only (DeepSpeed unpickles them): README "Security".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_config
from knowlip.train import checkpoint as ckpt


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(file: Path, marker: Path, reseal: bool) -> None:
    """Replace `file` by a pickle payload; `reseal`: rewrite meta.json's digest to match, as an attacker who can
    edit the whole folder would."""
    torch.save({"x": Payload(marker)}, file)
    if reseal:
        folder = next(p for p in file.parents if (p / ckpt.META).is_file())
        meta = json.loads((folder / ckpt.META).read_text())
        meta["files"][file.relative_to(folder).as_posix()] = ckpt.sha256_file(file)
        (folder / ckpt.META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def plain_run(tiny_in_process_base, tmp_path_factory) -> tuple[Path, list[str]]:
    """A plain-engine run stopped at step 2 with a checkpoint (never modified: tests copy it)."""
    from knowlip.train.trainer import Trainer

    run = tmp_path_factory.mktemp("plain") / "run"
    overrides = [*tiny_in_process_base, "train.steps=4"]
    assert Trainer(make_config(run, *overrides)).train(until=2)["stopped"] == "stop_at"
    return run, overrides


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def resume(run: Path, overrides: list[str]):
    from knowlip.train.trainer import Trainer

    return Trainer(make_config(run, *overrides))


def export(run: Path, _overrides):
    from knowlip.train.export import export_checkpoint

    return export_checkpoint(run, run.parent / "export")


def evaluate(run: Path, _overrides):
    from knowlip.train.export import load_model  # what `knowlip eval` loads a checkpoint with

    return load_model(run)


PLAIN_FILES = [ckpt.STATE, ckpt.MOMENTUM, f"{ckpt.RNG}/rank_00000.pt", "engine/plain_engine.pt"]


@pytest.mark.parametrize("action", [resume, export, evaluate], ids=["resume", "export", "eval"])
@pytest.mark.parametrize("name", PLAIN_FILES)
def test_a_changed_file_is_refused_by_name_before_it_is_opened(plain_run, tmp_path, name, action):
    run, overrides = plain_run
    run = copy_run(run, tmp_path)
    marker = tmp_path / "pwned"
    target = run / "checkpoints/step_00000002" / name
    plant(target, marker, reseal=False)
    with pytest.raises(ckpt.UntrustedCheckpoint, match=f"{target}: its sha256 does not match"):
        action(run, overrides)
    assert not marker.exists()


@pytest.mark.parametrize("action,name", [(resume, n) for n in PLAIN_FILES] +
                         [(export, n) for n in PLAIN_FILES if not n.startswith(ckpt.RNG)],  # export reads no RNG
                         ids=lambda v: getattr(v, "__name__", v))
def test_knowlip_files_never_run_code_even_with_meta_rewritten(plain_run, tmp_path, name, action):
    run, overrides = plain_run
    run = copy_run(run, tmp_path)
    marker = tmp_path / "pwned"
    plant(run / "checkpoints/step_00000002" / name, marker, reseal=True)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        action(run, overrides)
    assert not marker.exists()


def test_an_added_file_and_a_checkpoint_without_checksums_are_refused(plain_run, tmp_path, monkeypatch):
    run, overrides = plain_run
    run = copy_run(run, tmp_path)
    folder = run / "checkpoints/step_00000002"
    (folder / "engine/extra.pt").write_bytes(b"x")
    with pytest.raises(ckpt.UntrustedCheckpoint, match="extra.pt: not part of the checkpoint as saved"):
        export(run, overrides)
    (folder / "engine/extra.pt").unlink()
    meta = json.loads((folder / ckpt.META).read_text())
    del meta["files"]
    (folder / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(ckpt.UntrustedCheckpoint, match="no checksums recorded"):
        export(run, overrides)
    monkeypatch.setenv(ckpt.TRUST_UNVERIFIED, "1")  # the user's explicit choice for an old save
    assert export(run, overrides).is_file()


def test_a_planted_deepspeed_shard_never_runs(local_run, tiny_train_base, tmp_path):
    """DeepSpeed unpickles its own files: the digest check must stop a changed shard before resume (here at
    another world size, so through the universal converter), export, eval and `ckpt universal`."""
    run = copy_run(local_run, tmp_path)
    folder = ckpt.latest_complete(run / "checkpoints")
    marker = tmp_path / "pwned"
    shard = next((folder / ckpt.ENGINE_TAG).glob("*optim_states.pt"))
    plant(shard, marker, reseal=False)
    for action in (export, evaluate, lambda r, _o: ckpt.convert_to_universal(folder)):
        with pytest.raises(ckpt.UntrustedCheckpoint, match=f"{shard.name}: its sha256 does not match"):
            action(run, [])
        assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "knowlip.cli", "train", f"run_dir={run}", "dist.nproc_per_node=1",
                           *tiny_train_base, "train.steps=20"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"{shard.name}: its sha256 does not match" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../../etc/hostname", "/etc/hostname", "sub/shard-000000.tar",
                                  "..\\\\shard.tar", ".."])
def test_an_index_naming_a_shard_outside_its_folder_is_refused(synth_shards, tmp_path, name):
    from knowlip.data.shards import ShardError, load_index

    shutil.copytree(synth_shards, tmp_path / "shards")
    index_file = tmp_path / "shards/index.json"
    raw = json.loads(index_file.read_text())
    raw["shard_columns"]["name"][0] = name
    index_file.write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=rf"{index_file}: .*is not a plain file name inside the index's folder"):
        load_index(tmp_path / "shards")


def test_an_index_whose_top_level_is_not_an_object_is_named(tmp_path):
    from knowlip.data.shards import ShardError, load_index

    (tmp_path / "index.json").write_text("[1, 2]")
    with pytest.raises(ShardError, match=rf"{tmp_path / 'index.json'}: .*top level is a JSON list"):
        load_index(tmp_path)


def test_only_allow_listed_storage_protocols_are_opened():
    from knowlip.config import StorageConfig
    from knowlip.data.shards import ShardError, load_index
    from knowlip.data.storage import StorageError

    with pytest.raises(StorageError, match="memory://x/shards: the 'memory' protocol is not allowed"):
        load_index("memory://x/shards")
    with pytest.raises(ShardError, match="memory://x/shards/index.json: no shard index"):  # named: allowed
        load_index("memory://x/shards", StorageConfig(extra_protocols=["memory"]))


def test_secrets_are_masked_in_shown_and_saved_configs_and_do_not_change_the_hash(tmp_path, monkeypatch):
    from knowlip.config import config_changes, config_hash, load_config, to_yaml

    monkeypatch.setenv("KNOWLIP_TEST_TOKEN", "tok-123")
    common = ["storage.options.secret=S1", "mlflow.tracking_uri=http://user:pw99@mlflow.example:5000",
              "storage.options.session_token=${oc.env:KNOWLIP_TEST_TOKEN}"]
    a = load_config(None, ["storage.options.key=AK1", *common])
    rotated = load_config(None, ["storage.options.key=AK2", *common])
    assert config_hash(a) == config_hash(rotated) and config_changes(a, rotated) == []  # rotating is no change
    assert config_hash(a) != config_hash(load_config(None, ["storage.options.key=AK1", *common, "train.lr=1e-3"]))
    shown, saved = to_yaml(a, resolve=True), to_yaml(a)
    for text in (shown, saved):
        assert not any(s in text for s in ("AK1", "S1", "pw99", "tok-123")), text
    assert "http://***@mlflow.example:5000" in shown
    assert "${oc.env:KNOWLIP_TEST_TOKEN}" in saved  # saved as written ...
    (tmp_path / "config.yaml").write_text(saved)
    assert load_config(tmp_path / "config.yaml").storage.options.session_token == "tok-123"  # ... resolved on load

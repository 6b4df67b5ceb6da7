"""Sample integrity: checksums recorded at packing, verified by the loader on every read and by
`knowlip data verify`. Damage is planted by overwriting bytes inside one sample's chip payload, as a disk or a
copy would; the expected damaged sample is found independently, from the tar members' own offsets."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from knowlip.data.loader import StreamingLoader
from knowlip.data.shards import load_index

CLI = [sys.executable, "-m", "knowlip.cli"]


@pytest.fixture
def shards(synth_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out)
    return out


def damage_chip(shard: Path, member_number: int = 4) -> str:
    """Overwrite 16 bytes in the middle of a chip payload; returns that sample's key."""
    with tarfile.open(shard) as tar:
        chips = [m for m in tar.getmembers() if m.name.endswith(".chip.npy")]
    target = chips[member_number]
    with shard.open("r+b") as f:
        f.seek(target.offset_data + target.size // 2)
        f.write(b"\xff" * 16)
    return target.name.split(".")[0]


def verify(shards: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["data", "verify", str(shards), *args], capture_output=True, text=True, timeout=300)


def all_keys(shards: Path) -> tuple[list[str], StreamingLoader]:
    loader = StreamingLoader(shards, batch_size=4, drop_last=False)
    keys = [k for batch in loader for k, dup in zip(batch["keys"], batch["is_duplicate"]) if not dup]
    return keys, loader


def test_clean_shards_verify_and_record_checksums(shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["checksum"] == "xxh3_64"
    assert all(len(s["checksums"]) == s["samples"] and all(len(c) == 3 for c in s["checksums"])
               for s in index["shards"])
    proc = verify(shards)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.parametrize("jobs", [1, 2])
def test_damaged_chip_bytes_are_named_by_verify_and_skipped_by_the_loader(shards, jobs):
    shard = sorted(shards.glob("shard-*.tar"))[1]
    key = damage_chip(shard)
    proc = verify(shards, "--jobs", str(jobs))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"damaged: {shard.name} sample 4 ({key}): chip.npy bytes differ" in proc.stdout
    assert f"{shard.name}: sha256 differs" in proc.stdout
    assert "DAMAGED: 1 samples, 1 shards" in proc.stdout
    keys, loader = all_keys(shards)
    assert key not in keys and len(keys) == load_index(shards).total_samples - 1
    assert loader.stats.skipped == 1 and loader.stats.skipped_by_cause == {"checksum": 1}
    assert key in loader.stats.skipped_examples[0] and shard.name in loader.stats.skipped_examples[0]


def test_an_index_without_checksums_still_loads_and_verify_says_so(shards):
    index = json.loads((shards / "index.json").read_text())
    for s in index["shards"]:
        del s["checksums"]
    del index["checksum"]
    (shards / "index.json").write_text(json.dumps(index))
    keys, loader = all_keys(shards)
    assert len(keys) == index["total_samples"] and loader.stats.skipped == 0
    proc = verify(shards)
    assert proc.returncode == 0 and "no per-sample checksums" in proc.stdout, proc.stdout + proc.stderr

"""Sample integrity: checksums recorded at packing, verified by the loader on every read and by
`knowlip data verify`. Damage is planted by overwriting bytes inside one sample's chip payload, as a disk or a
copy would; the expected damaged sample is found independently, from the tar members' own offsets."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xxhash

from knowlip.data.loader import StreamingLoader
from knowlip.data.shards import index_v1_body, load_index

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


def tar_members(shard: Path) -> list[dict[str, tuple[int, bytes]]]:
    """Per sample, in tar order: ext -> (header offset, payload), read with the standard tarfile module."""
    samples: list[dict] = []
    with tarfile.open(shard) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = (m.offset, tar.extractfile(m).read())
    return samples


def test_clean_shards_verify_and_record_checksums(shards):
    """The sample table beside each shard holds every sample's offset and each member's XXH3-64, as computed
    here from the tar members themselves; index.json holds per-shard facts only."""
    index = json.loads((shards / "index.json").read_text())
    assert index["checksum"] == "xxh3_64" and index["version"] == 2 and "shards" not in index
    for name in index["shard_columns"]["name"]:
        table = np.load(shards / name.replace(".tar", ".idx.npy"))
        samples = tar_members(shards / name)
        assert len(table) == len(samples)
        for row, sample in zip(table, samples):
            assert row["offset"] == sample["chip.npy"][0]  # the first member's header
            assert row["members"] == 0b111
            assert list(row["checksum"]) == [xxhash.xxh3_64_intdigest(sample[ext][1])
                                             for ext in ("chip.npy", "txt", "json")]
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
    index = index_v1_body(load_index(shards), checksums=False)  # format 1, before per-sample checksums
    for table in shards.glob("*.idx.npy"):
        table.unlink()
    (shards / "index.json").write_text(json.dumps(index))
    keys, loader = all_keys(shards)
    assert len(keys) == index["total_samples"] and loader.stats.skipped == 0
    proc = verify(shards)
    assert proc.returncode == 0 and "no per-sample checksums" in proc.stdout, proc.stdout + proc.stderr


def test_a_version_1_index_with_checksums_loads_and_still_catches_damage(shards):
    """Shards packed by the previous release (offsets and hex checksums inside index.json, no sample tables)."""
    expected_keys, _ = all_keys(shards)
    (shards / "index.json").write_text(json.dumps(index_v1_body(load_index(shards))))
    for table in shards.glob("*.idx.npy"):
        table.unlink()
    assert load_index(shards).version == 1
    keys, _ = all_keys(shards)
    assert keys == expected_keys  # the same order and samples as from the version-2 index
    shard = sorted(shards.glob("shard-*.tar"))[0]
    key = damage_chip(shard, member_number=2)
    keys, loader = all_keys(shards)
    assert key not in keys and loader.stats.skipped_by_cause == {"checksum": 1}


def test_per_sample_damage_alone_fails_verify(shards):
    """A sample table that disagrees with an intact tar (whose sha256 still matches): verify must not say OK."""
    shard = sorted(shards.glob("shard-*.tar"))[1]
    table_file = shard.with_name(shard.name.replace(".tar", ".idx.npy"))
    table = np.load(table_file)
    table["checksum"][4][1] ^= 1  # the recorded caption checksum of sample 4
    np.save(table_file, table)
    key = tar_members(shard)[4]["__key__"]
    proc = verify(shards)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"damaged: {shard.name} sample 4 ({key}): txt bytes differ" in proc.stdout
    assert "sha256 differs" not in proc.stdout and "DAMAGED: 1 samples, 0 shards" in proc.stdout


def test_a_changed_caption_byte_is_named_and_skipped(shards):
    """Damage outside the chip: one byte of a caption. Every member's checksum is compared, not the chip's only."""
    shard = sorted(shards.glob("shard-*.tar"))[0]
    sample = tar_members(shard)[2]
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{sample['__key__']}.txt")
    with shard.open("r+b") as f:
        f.seek(member.offset_data)
        first = f.read(1)
        f.seek(member.offset_data)
        f.write(bytes([first[0] ^ 0x20]))  # a letter's case flipped: still a plausible caption
    proc = verify(shards)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"damaged: {shard.name} sample 2 ({sample['__key__']}): txt bytes differ" in proc.stdout
    keys, loader = all_keys(shards)
    assert sample["__key__"] not in keys and loader.stats.skipped_by_cause == {"checksum": 1}

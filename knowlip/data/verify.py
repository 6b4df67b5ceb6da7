"""`knowlip data verify`: every shard's sha256 and every sample's member checksums, damage named sample by sample."""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from knowlip.data.shards import CorruptSample, ShardError, ShardIndex, load_index
from knowlip.data.storage import StorageOptions

_INDEX: ShardIndex | None = None  # a pool worker's copy, sent once (not once per shard)


def _init_worker(index: ShardIndex) -> None:
    global _INDEX
    _INDEX = index


def _damage(shard_name: str, samples) -> list[str]:
    """The damaged ones of (sample number, members or ShardError) pairs, named as the loader would."""
    damaged = []
    for i, members in samples:
        if isinstance(members, CorruptSample):
            damaged.append(str(members))
        elif isinstance(members, ShardError):
            damaged.append(f"{shard_name} sample {i}: unreadable ({members})")
    return damaged


def verify_shard(s: int, index: ShardIndex | None = None) -> dict:
    """Shard number s: its sha256 against the index, then each sample checked as the loader would. A local
    shard is streamed for the hash and its samples read by position; a remote one is fetched once for both."""
    index = index or _INDEX
    assert index is not None
    shard = index.shard(s)
    result = {"shard": shard.name, "sha256_ok": False, "damaged": []}
    try:
        table = index.table(s)
    except ShardError as exc:  # its sample table is damaged: nothing of the shard can be located
        table = None
        result["damaged"].append(f"{shard.name}: every sample unreadable ({exc})")
    if index.store.remote:
        data = index.store.read(shard.name)
        result["sha256_ok"] = hashlib.sha256(data).hexdigest() == shard.sha256
        if table is not None:
            spans = ((i, *table.sample_range(i)) for i in range(shard.samples))
            result["damaged"] += _damage(shard.name, ((i, table.checked(i, data[o:o + n])) for i, o, n in spans))
        return result
    h = hashlib.sha256()
    with index.store.path(shard.name).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    result["sha256_ok"] = h.hexdigest() == shard.sha256
    if table is not None:
        result["damaged"] += _damage(shard.name, index.shard_samples(s))
    return result


def verify_shards(root: str | Path, jobs: int = 1, storage: StorageOptions | None = None) -> dict:
    """The whole shard folder or prefix, `jobs` shards at a time. report["ok"] is False on any damage."""
    index = load_index(root, storage)
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(index,)) as pool:
            results = list(pool.map(verify_shard, range(index.num_shards)))
    else:
        results = [verify_shard(s, index) for s in range(index.num_shards)]
    damaged = [d for r in results for d in r["damaged"]]
    bad_files = [r["shard"] for r in results if not r["sha256_ok"]]
    return {"root": str(index.root), "shards": len(results), "samples": index.total_samples,
            "per_sample_checksums": index.has_checksums, "shards_with_wrong_sha256": bad_files,
            "damaged_samples": damaged, "ok": not damaged and not bad_files}


def format_report(report: dict) -> str:
    lines = [f"{report['root']}: {report['shards']} shards, {report['samples']} samples"]
    if not report["per_sample_checksums"]:
        lines.append("  this index has no per-sample checksums (packed before they were recorded): only the shards' "
                     "sha256 are checked; re-pack to check each sample")
    for name in report["shards_with_wrong_sha256"]:
        lines.append(f"  {name}: sha256 differs from the index (the file changed after packing)")
    for d in report["damaged_samples"]:
        lines.append(f"  damaged: {d}")
    lines.append("  OK" if report["ok"] else f"  DAMAGED: {len(report['damaged_samples'])} samples, "
                 f"{len(report['shards_with_wrong_sha256'])} shards")
    return "\n".join(lines)

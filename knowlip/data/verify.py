"""`knowlip data verify`: every shard's sha256 and every sample's member checksums, damage named sample by sample."""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from knowlip.data.shards import CorruptSample, ShardError, ShardInfo, load_index, read_sample_bytes


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_shard(path: Path, shard: ShardInfo) -> dict:
    """One shard: its sha256 against the index, then each sample read and checked as the loader would."""
    result = {"shard": shard.name, "sha256_ok": _file_sha256(path) == shard.sha256, "damaged": []}
    with path.open("rb") as f:
        for i in range(shard.samples):
            try:
                read_sample_bytes(f, shard, i)
            except CorruptSample as exc:
                result["damaged"].append(str(exc))
            except (ShardError, ValueError, EOFError) as exc:
                result["damaged"].append(f"{shard.name} sample {i}: unreadable ({exc})")
    return result


def verify_shards(root: str | Path, jobs: int = 1) -> dict:
    """The whole shard folder, `jobs` shards at a time. report["ok"] is False on any damage."""
    index = load_index(root)
    work = [(index.path(s), s) for s in index.shards]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(verify_shard, *zip(*work)))
    else:
        results = [verify_shard(p, s) for p, s in work]
    with_checksums = all(s.checksums for s in index.shards)
    damaged = [d for r in results for d in r["damaged"]]
    bad_files = [r["shard"] for r in results if not r["sha256_ok"]]
    return {"root": str(index.root), "shards": len(results), "samples": index.total_samples,
            "per_sample_checksums": with_checksums, "shards_with_wrong_sha256": bad_files, "damaged_samples": damaged,
            "ok": not damaged and not bad_files}


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

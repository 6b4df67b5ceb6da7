"""What a loader process pays before its first batch, as the dataset grows to a billion samples.

    .venv/bin/python bench/loader_scale.py                    # 1e6 .. 1e9 samples, cursor at start and middle
    .venv/bin/python bench/loader_scale.py --sizes 1e6 1e7 --v1   # also the version-1 index (every offset in JSON)

A simulation on synthetic indexes, no real samples: for each size a folder gets an index.json (version 2,
`--samples-per-shard` per shard), every shard as a sparse file of its listed size, and a sample table per shard
(real tables where the first batch looks, sparse stand-ins elsewhere: they are listed and stat'ed like real ones
but never read). Each measurement runs in a fresh interpreter: after the imports it records its resident memory,
then does what a rank does before its first batch: load_index (parse, check every shard and table exists with
its size), build the StreamingLoader, load a loader state at the cursor, take the first batch's ids from the
epoch order and read the sample tables they fall in, and locate every sample's byte range. Reading the samples
themselves is the same at any size and is left out. Reports the peak resident memory above the post-import
baseline (VmHWM) and the wall time of those steps. Targets (issue 13): < 100 MB and < 1 s at 1e9 samples.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import JsonLines  # noqa: E402

emit = JsonLines()
SAMPLE_BYTES = 200_000  # a 224 px two-band float32 chip with its caption and metadata, roughly


def proc_status_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process. Not ru_maxrss: Linux carries that across
    exec from the forking parent, so a child started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def make_dataset(root: Path, samples: int, per_shard: int, batch: int, seed: int, block: int) -> None:
    """index.json + sparse shards + sample tables (real ones only where the measured batches read)."""
    from knowlip.data.loader import LazyOrder
    from knowlip.data.shards import SAMPLE_TABLE, table_name

    root.mkdir(parents=True, exist_ok=True)
    shards = (samples + per_shard - 1) // per_shard
    counts = np.full(shards, per_shard, np.int64)
    counts[-1] = samples - per_shard * (shards - 1)
    names = [f"shard-{s:06d}.tar" for s in range(shards)]
    sizes = counts * SAMPLE_BYTES + 1024
    columns = {"name": names, "samples": counts.tolist(), "bytes": sizes.tolist(),
               "end": (counts * SAMPLE_BYTES).tolist(), "sha256": ["0" * 64] * shards}
    body = {"format": "knowlip-shards", "version": 2, "checksum": "xxh3_64", "total_samples": samples,
            "num_shards": shards, "report": {"dtypes": {"float32": samples}}, "shard_columns": columns}
    (root / "index.json").write_text(json.dumps(body))
    order = LazyOrder(counts, seed, 0, block)
    starts = np.concatenate([[0], np.cumsum(counts)])
    wanted = set()
    for cursor in (0, samples // 2):
        ids = order[cursor : cursor + batch]
        wanted |= set((np.searchsorted(starts, ids, side="right") - 1).tolist())
    for s, (name, n, size) in enumerate(zip(names, counts.tolist(), sizes.tolist())):
        with open(root / name, "wb") as f:
            f.truncate(size)
        table = root / table_name(name)
        if s in wanted:
            rows = np.zeros(n, SAMPLE_TABLE)
            rows["offset"] = np.arange(n, dtype=np.uint64) * SAMPLE_BYTES
            rows["members"] = 0b111
            np.save(table, rows, allow_pickle=False)
        else:
            with open(table, "wb") as f:
                f.truncate(128 + n * SAMPLE_TABLE.itemsize)


def measure(root: str, cursor_at: str, batch: int, seed: int, block: int) -> dict:
    """In this (fresh) process: the steps before a first batch, with memory and time."""
    import knowlip.data.loader as loader_mod
    from knowlip.data.shards import load_index

    base_kib = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    index = load_index(root)
    t_index = time.perf_counter()
    loader = loader_mod.StreamingLoader(index, batch, seed=seed, shuffle_block=block)
    state = loader.state_dict()
    state["cursor"] = 0 if cursor_at == "start" else (index.total_samples // 2) // batch * batch
    state["step_in_epoch"] = state["cursor"] // batch
    loader.load_state_dict(state)
    steps = loader.remaining_steps()
    lo, hi = steps[0][0]
    ids = loader.order(loader.epoch)[lo:hi]
    reader = loader_mod.ShardReader(index)
    located = [reader.locate(int(g)) for g in ids]
    ranges = [index.table(s).sample_range(i) for s, i in located]
    elapsed = time.perf_counter() - t0
    peak_kib = proc_status_kib("VmHWM")
    assert len(ranges) == batch and all(length == SAMPLE_BYTES for _, length in ranges[:-1] if length > 0)
    return {"index_s": round(t_index - t0, 3), "first_batch_s": round(elapsed, 3),
            "peak_above_baseline_mib": round((peak_kib - base_kib) / 1024, 1), "baseline_mib": round(base_kib / 1024, 1),
            "tables_read": len({s for s, _ in located})}


def measure_v1(root: str) -> dict:
    """The version-1 index (every sample's offset in index.json) of the same dataset: load_index alone."""
    from knowlip.data.shards import load_index

    base_kib = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    index = load_index(root)
    index.table(0)
    elapsed = time.perf_counter() - t0
    return {"index_s": round(elapsed, 3),
            "peak_above_baseline_mib": round((proc_status_kib("VmHWM") - base_kib) / 1024, 1)}


def child(args) -> int:
    spec = json.loads(args.child)
    result = measure_v1(spec["root"]) if spec.get("v1") else measure(spec["root"], spec["cursor"], spec["batch"],
                                                                      spec["seed"], spec["block"])
    print(json.dumps(result))
    return 0


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_v1(root: Path, out: Path) -> None:
    """The same dataset under a version-1 index (offsets in JSON, no tables): what knowlip wrote before."""
    out.mkdir(parents=True, exist_ok=True)
    body = json.loads((root / "index.json").read_text())
    c = body.pop("shard_columns")
    shards = []
    for name, n, size, end, sha in zip(c["name"], c["samples"], c["bytes"], c["end"], c["sha256"]):
        (out / name).symlink_to(root / name)
        shards.append({"name": name, "samples": n, "bytes": size, "end": end, "sha256": sha,
                       "offsets": list(range(0, n * SAMPLE_BYTES, SAMPLE_BYTES))})
    body.update(version=1, shards=shards)
    (out / "index.json").write_text(json.dumps(body))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8, 1e9])
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shuffle-block", type=int, default=8192)
    parser.add_argument("--v1", action="store_true", help="also time the version-1 index (sizes up to 1e7)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    emit.out = args.out
    with tempfile.TemporaryDirectory(prefix="knowlip-scale-") as tmp:
        for size in args.sizes:
            samples = int(size)
            root = Path(tmp) / f"n{samples}"
            t0 = time.perf_counter()
            make_dataset(root, samples, args.samples_per_shard, args.batch, 0, args.shuffle_block)
            setup = time.perf_counter() - t0
            index_mib = (root / "index.json").stat().st_size / 2**20
            for cursor in ("start", "middle"):
                row = run_child({"root": str(root), "cursor": cursor, "batch": args.batch, "seed": 0,
                                 "block": args.shuffle_block})
                emit({"bench": "loader_scale", "samples": samples, "shards": -(-samples // args.samples_per_shard),
                      "cursor": cursor, "index_json_mib": round(index_mib, 2), "setup_s": round(setup, 1), **row})
            if args.v1 and samples <= 10**7:
                write_v1(root, Path(tmp) / f"v1-{samples}")
                row = run_child({"root": str(Path(tmp) / f"v1-{samples}"), "v1": True})
                emit({"bench": "loader_scale_v1_index", "samples": samples,
                      "index_json_mib": round((Path(tmp) / f"v1-{samples}" / "index.json").stat().st_size / 2**20, 1),
                      **row})
            import shutil

            shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())

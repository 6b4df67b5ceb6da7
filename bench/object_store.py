"""The loader reading shards from an S3-compatible server on loopback (moto) against reading them from disk.

    .venv/bin/python bench/object_store.py            # packs synthetic scenes, uploads them, one epoch each way

Reports samples/s and MB/s for one epoch (batch 16, shuffled), with 0 and 2 loader workers, and the object-store
requests per batch with range coalescing on (the default 1 MiB gap) and off. Loopback has no network latency
worth the name, so these figures show the client's own cost, not a data centre's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import JsonLines  # noqa: E402

emit = JsonLines()


def start_moto(port: int, log: Path) -> subprocess.Popen:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto_server did not start (see {log})")


def epoch(shards, storage, batch: int, workers: int) -> dict:
    from knowlip.data.loader import StreamingLoader
    from knowlip.data.shards import load_index

    index = load_index(shards, storage)
    loader = StreamingLoader(index, batch, num_workers=workers, shuffle_block=8192, drop_last=False)
    start = time.perf_counter()
    samples = batches = nbytes = 0
    for b in loader:
        samples += len(b["keys"])
        nbytes += b["chips"].numel() * b["chips"].element_size()
        batches += 1
    seconds = time.perf_counter() - start
    row = {"samples": samples, "seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1),
           "chip_MB_per_s": round(nbytes / seconds / 1e6, 1)}
    if workers == 0:  # the requests were made in this process
        row["requests_per_batch"] = round(index.store.stats.requests / batches, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    emit.out = args.out
    from knowlip.config import load_config
    from knowlip.data.pack import pack
    from knowlip.data.storage import StorageOptions
    from knowlip.sar.synth import synthesise_from_config

    with tempfile.TemporaryDirectory(prefix="knowlip-s3-bench-") as tmp:
        port = 18000 + os.getpid() % 1000
        server = start_moto(port, Path(tmp) / "moto.log")
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL_S3=endpoint)
        try:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            base = [f"synth.out_dir={tmp}/scenes", f"pack.inputs=[{tmp}/scenes]", f"synth.num_scenes={args.scenes}",
                    "synth.size=512", "pack.chip.size=128", "pack.chip.stride=128", "pack.shard_max_samples=64"]
            synthesise_from_config(load_config(None, base))
            local = f"{tmp}/shards"
            pack(load_config(None, base + [f"pack.out_dir={local}"]))
            remote = "s3://bench/shards"
            t0 = time.perf_counter()
            pack(load_config(None, base + [f"pack.out_dir={remote}"]))
            emit({"bench": "pack_to_s3", "seconds": round(time.perf_counter() - t0, 2)})
            for workers in (0, 2):
                emit({"bench": "loader_epoch", "from": "local disk", "workers": workers,
                      **epoch(local, None, args.batch, workers)})
                emit({"bench": "loader_epoch", "from": "s3 loopback (moto)", "workers": workers,
                      **epoch(remote, StorageOptions(), args.batch, workers)})
            emit({"bench": "loader_epoch", "from": "s3 loopback (moto), coalescing off", "workers": 0,
                  **epoch(remote, StorageOptions(coalesce_gap_bytes=-1), args.batch, 0)})
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

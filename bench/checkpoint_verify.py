"""What the sha256 check of a checkpoint costs on resume (README "Security"): every file of the checkpoint is
hashed before DeepSpeed or torch opens it.

Measures the check on a real checkpoint (default: the newest of runs/quickstart, written by `make quickstart`)
and the hashing rate on a 1 GiB file, then extrapolates to a `base` ZeRO-3 checkpoint from its parameter count
(bf16 weights + fp32 masters + two fp32 Adam moments per trainable parameter, fp32 momentum weights, queues).

    .venv/bin/python bench/checkpoint_verify.py [CHECKPOINT_OR_RUN]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knowlip.train import checkpoint as ckpt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def base_checkpoint_bytes() -> int:
    """Bytes of a `base` ZeRO-3 bf16 checkpoint, from the model's own parameter count."""
    import torch

    from knowlip.model.dims import preset
    from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens

    with torch.device("meta"):
        model = SarKnowLIP(preset("base"), 30_522, SpecialTokens(0, 101, 102, 103, 104, 105))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # the momentum copies
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return trainable * (2 + 4 + 4 + 4) + frozen * 4 + buffers


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "runs/quickstart"
    path = ckpt.resolve_checkpoint(source)
    size = ckpt.folder_bytes(path)
    check = timed(lambda: ckpt.verify_checkpoint(path))
    print(f"checkpoint {path}: {size / 2**20:.1f} MiB, {len(ckpt.read_meta(path)['files'])} files; "
          f"verify {check * 1e3:.1f} ms ({size / check / 2**20:.0f} MiB/s)")
    with tempfile.NamedTemporaryFile(dir=path.parent) as f:
        f.write(os.urandom(1 << 20) * 1024)
        f.flush()
        rate = (1 << 30) / timed(lambda: ckpt.sha256_file(Path(f.name)), repeat=2)
    print(f"sha256 of a 1 GiB file: {rate / 2**20:.0f} MiB/s")
    base = base_checkpoint_bytes()
    print(f"base ZeRO-3 checkpoint ~{base / 2**30:.2f} GiB: verify ~{base / rate:.1f} s at that rate (once per "
          f"resume, on rank 0; and once per save)")


if __name__ == "__main__":
    main()

"""The one home of torch.distributed for knowlip: starting the process group, where this process sits, and the
few collectives the trainer, the checkpoints and evaluation use. Every helper works in a single process without
a process group (rank 0 of 1, collectives are no-ops), so callers never test for one themselves.

The autograd-aware gathers of the contrastive losses live in knowlip.model.distributed and build on this.
"""

from __future__ import annotations

import datetime
import importlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from knowlip.launch.local import RankEnv


def is_distributed() -> bool:
    """True when a process group is up (the only place that asks torch.distributed)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def get_rank() -> int:
    return rank_and_world()[0]


def get_world_size() -> int:
    return rank_and_world()[1]


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce_floats(values: list[float], op: str, device: torch.device) -> list[float]:
    """`values` reduced over ranks element-wise; op is "max" or "sum"."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if get_world_size() > 1:
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return t.tolist()


def shutdown() -> None:
    """Leave the process group (every rank together), so that no communication thread outlives the process."""
    if is_distributed():
        barrier()
        dist.destroy_process_group()


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (~95 s) at its first init. gloo is
    correct without it, so skip the build (cpu-stack.md)."""
    # importlib, not `import deepspeed.comm.torch as m`: that name resolves to the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_process_group(ranks: RankEnv, device: torch.device, backend: str, timeout_s: int) -> None:
    """torch.distributed through DeepSpeed's comm layer (training): nccl on GPUs, gloo on CPU."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    else:
        _skip_shm_comm_build()
    ranks.export()
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               verbose=False)


def init_plain_process_group(ranks: RankEnv, backend: str) -> None:
    """torch.distributed without DeepSpeed (evaluation): env:// rendezvous from the rank environment."""
    ranks.export()
    dist.init_process_group(backend, init_method="env://", rank=ranks.rank, world_size=ranks.world_size)

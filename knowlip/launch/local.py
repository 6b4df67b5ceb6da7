"""Where this process sits in the job, and spawning local ranks.

One entry point serves three cases:
- launched by torchrun (or anything setting RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT): one rank;
- a Slurm task (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID): one rank, rendezvous derived from the job;
- neither: `spawn_local_ranks` starts `dist.nproc_per_node` copies of the command with a torchrun-compatible
  environment, forwards SIGTERM/SIGUSR1/SIGINT to them (each rank in its own process group, so that a Ctrl-C
  reaches them once, through the launcher), and tears the group down when one rank fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from knowlip.launch.signals import INTERRUPTED_EXIT

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def export(self) -> None:
        """Write the torchrun variables into os.environ (torch.distributed's env:// reads them)."""
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                           "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
                           "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)})


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[03-05,7],cpu1' -> 'gpu03'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def rank_env(environ: Mapping[str, str] = os.environ) -> RankEnv | None:
    """This process's place in a job already set up by torchrun or Slurm; None when it is on its own."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        return RankEnv(int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", environ["RANK"])),
                       int(environ.get("LOCAL_WORLD_SIZE", world)), environ.get("MASTER_ADDR", "127.0.0.1"),
                       int(environ.get("MASTER_PORT", "29500")))
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "SLURM_JOB_ID" in environ:
        world = int(environ["SLURM_NTASKS"])
        nodes = int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", "1")))
        addr = environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        # A port derived from the job id: every task computes the same one without talking.
        port = int(environ.get("MASTER_PORT", 20000 + int(environ["SLURM_JOB_ID"]) % 20000))
        return RankEnv(int(environ["SLURM_PROCID"]), world, int(environ.get("SLURM_LOCALID", 0)),
                       max(1, world // max(1, nodes)), addr, port)
    return None


def resolve_device(name: str = "auto", local_rank: int = 0) -> "torch.device":
    """train.device (auto | cpu | cuda) for the local rank: its own GPU when there is one."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def local_rank_count(setting: str) -> int:
    """dist.nproc_per_node: a number, or auto (one per visible GPU, 2 on a CPU-only machine)."""
    if setting != "auto":
        return int(setting)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local_ranks(nproc: int, command: Sequence[str], grace_s: float = 5.0) -> int:
    """Run `command` as ranks 0..nproc-1 of one job on this machine; return the job's exit code (0 when every
    rank exited 0, else the first failure's code, 128+N for a rank killed by signal N)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        # its own process group: a terminal's Ctrl-C reaches only this launcher, which forwards it once
        procs.append(subprocess.Popen(list(command), env=env, process_group=0))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        return _wait_all(procs, grace_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_all(procs: list[subprocess.Popen], grace_s: float) -> int:
    failed_at, code = None, 0
    while any(p.poll() is None for p in procs):
        failures = [p.returncode for p in procs if p.returncode not in (None, 0, INTERRUPTED_EXIT)]
        if failures and failed_at is None:
            failed_at, code = time.monotonic(), _exit_code(failures[0])
            print(f"knowlip: a rank exited with {failures[0]}; stopping the others", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    if code == 0:
        code = next((_exit_code(p.returncode) for p in procs if p.returncode != 0), 0)
    return code


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode

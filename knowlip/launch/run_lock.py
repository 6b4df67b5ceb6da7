"""One writer per run: an exclusive lock on `<run_dir>/.lock` (and on `<ckpt.dir>/.lock` when the checkpoints
live outside the run folder), held for the job's life.

The lock is `flock`: the kernel releases it when the holding process ends, however it ends (a crash, SIGKILL,
a requeue), so it is never stale. The file names its holder (host, pid, Slurm job id, start time) for the
message a second job gets. Who holds it: `knowlip train`'s launcher when it starts local ranks (its rank 0
sees that its parent holds it), else rank 0 (a torchrun or Slurm job), before any process group exists.
On a network file system flock works where the client forwards locks (NFSv4, Lustre with `flock` mounts).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"

_held: dict[Path, int] = {}  # lock file -> open descriptor, for the life of this process


class RunLocked(RuntimeError):
    """Another job holds the run folder."""


def holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not yet written its name"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


def _read_holder(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _held_by_parent(holder: dict | None) -> bool:
    """Our own launcher (`knowlip train` starting local ranks) holds it for this job."""
    return bool(holder) and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getppid()


def acquire(folder: str | Path, what: str = "run folder") -> None:
    """Hold `folder`'s lock until this process ends; RunLocked naming the holder when another job has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_NAME).resolve()
    if path in _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        if _held_by_parent(holder):
            return
        raise RunLocked(f"{folder}: this {what} is in use by another job ({describe(holder)}); one job writes "
                        "a run at a time: wait for it to end, stop it, or use another run_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder_record()).encode())
    _held[path] = fd


def release(folder: str | Path) -> None:
    fd = _held.pop((Path(folder) / LOCK_NAME).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def lock_run(cfg) -> None:
    """Lock the run folder, and the checkpoint folder when it lies outside it."""
    acquire(cfg.run_dir)
    if cfg.ckpt.dir:
        ckpt, run = Path(cfg.ckpt.dir).resolve(), Path(cfg.run_dir).resolve()
        if run != ckpt and run not in ckpt.parents:
            acquire(ckpt, "checkpoint folder (ckpt.dir)")


def check_unlocked(cfg) -> None:
    """Raise RunLocked when a running job holds the run (for `knowlip submit`: the lock is not kept)."""
    for folder in [cfg.run_dir] + ([cfg.ckpt.dir] if cfg.ckpt.dir else []):
        path = Path(folder) / LOCK_NAME
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{folder}: in use by a running job ({describe(_read_holder(fd))}); a second job on "
                            "it would exit at once: use another run_dir, or wait for that job") from None
        finally:
            os.close(fd)

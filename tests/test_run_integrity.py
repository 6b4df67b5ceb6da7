"""Run integrity (issue 21): one writer per run, resume that follows the run's history, no hang when one rank
fails, non-finite gradients skipped. Real processes and DeepSpeed over gloo; the Slurm cases are in
test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import losses, make_config, wait_for_steps
from knowlip.launch.run_lock import RunLocked, check_unlocked, lock_run


def _train(run: Path, base: list[str], *extra: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "knowlip.cli", "train", f"run_dir={run}", "dist.nproc_per_node=2",
                             *base, *extra], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_a_second_job_on_the_same_run_exits_at_once_and_the_first_logs_each_step_once(tiny_train_base, tmp_path):
    run = tmp_path / "run"
    first = _train(run, tiny_train_base, env={"KNOWLIP_FAULT_SLOW_STEPS": "1-8"})
    wait_for_steps(run, 1)
    started = time.monotonic()
    second = _train(run, tiny_train_base)
    out, err = second.communicate(timeout=120)
    took = time.monotonic() - started
    assert second.returncode == 1, out + err
    assert f"in use by another job (pid {first.pid} on " in err and "use another run_dir" in err, err
    assert "Traceback" not in err and took < 30, (took, err)
    assert first.poll() is None, "the first job must still be training when the second one gives up"
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    assert sorted(losses(run)) == list(range(1, 9))


def test_the_lock_names_its_holder_covers_ckpt_dir_and_dies_with_it(tmp_path):
    """A process holding a checkpoint folder (ckpt.dir outside the run) keeps another run out of it; once the
    holder is killed (SIGKILL: no clean-up runs) the lock is free again, never stale."""
    shared_ckpt = tmp_path / "ckpts"
    holder_cfg = make_config(tmp_path / "a", f"ckpt.dir={shared_ckpt}")
    code = ("import sys, time; from knowlip.config import load_config; from knowlip.launch.run_lock import lock_run; "
            f"lock_run(load_config(None, ['run_dir={tmp_path}/a', 'ckpt.dir={shared_ckpt}'])); print('held', "
            "flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = make_config(tmp_path / "b", f"ckpt.dir={shared_ckpt}")
        with pytest.raises(RunLocked, match=f"{shared_ckpt}: this checkpoint folder .* in use by another job "
                                            f"\\(pid {holder.pid} on "):
            lock_run(other)
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            check_unlocked(holder_cfg)  # what `knowlip submit` asks before sbatch
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_unlocked(holder_cfg)
    lock_run(make_config(tmp_path / "c", f"ckpt.dir={shared_ckpt}"))
    record = json.loads((shared_ckpt / ".lock").read_text())
    assert record["pid"] == os.getpid() and record["host"]

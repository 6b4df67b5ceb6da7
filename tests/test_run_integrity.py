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


def test_a_rollback_resumes_the_new_branch_and_keeps_the_old_one_aside(tiny_in_process_base, tmp_path):
    """The issue's case: 8 steps (checkpoints every 2, keep 3), a rollback to step 4 with a new lr stopped at 6,
    then resume=auto (what every requeue does) continues the new branch, not the abandoned step 8; metrics.jsonl
    reads 1..8 once, the old branch's rows and checkpoints are kept aside and `ckpt ls` lists them."""
    from knowlip.train.checkpoint import abandoned_branches, read_meta
    from knowlip.train.trainer import Trainer

    run = tmp_path / "run"
    base = [*tiny_in_process_base, "train.steps=8", "train.log_every=1", "ckpt.every=2", "ckpt.keep=3"]
    Trainer(make_config(run, *base)).train()
    old = {s: l for s, l in losses(run).items()}
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]
    rollback = Trainer(make_config(run, *base, "train.lr=1e-4", f"resume={root / 'step_00000004'}", "train.stop_at=6"))
    assert rollback.step == 4
    rollback.train()
    resumed = Trainer(make_config(run, *base, "train.lr=1e-4"))
    assert resumed.resumed_from == root / "step_00000006" and resumed.step == 6
    assert read_meta(root / "step_00000006")["seq"] > read_meta(root / "step_00000004")["seq"]
    resumed.train()
    new = losses(run)
    assert sorted(new) == list(range(1, 9))
    assert [new[s] for s in range(1, 6)] == [old[s] for s in range(1, 6)] and new[6] != old[6]  # the lr acts at step 5
    [(folder, note, kept)] = abandoned_branches(root)
    assert [c.step for c in kept] == [6, 8] and note["resumed_from"] == str(root / "step_00000004")
    aside = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in aside] == [(s, old[s]) for s in range(5, 9)]
    ls = subprocess.run([sys.executable, "-m", "knowlip.cli", "ckpt", "ls", str(run)], capture_output=True, text=True)
    assert ls.returncode == 0 and f"abandoned: {folder}" in ls.stdout, ls.stdout + ls.stderr
    assert "step_00000008" in ls.stdout.split("abandoned:")[1] and "latest (resume=auto)" in ls.stdout

    with pytest.raises(ValueError, match="resume=none, but this run already has a history"):
        Trainer(make_config(run, *base, "resume=none"))
    assert sorted(losses(run)) == list(range(1, 9))  # refused before it wrote anything


def test_a_failed_save_on_rank_0_ends_every_rank_fast_and_keeps_the_last_checkpoint(tiny_train_base, tmp_path):
    """ENOSPC in rank 0's save at step 4 while rank 1 waits in the save's next collective: the job exits
    non-zero within seconds (not the collective timeout), step 2 stays whole and the next start resumes it."""
    from knowlip.train.checkpoint import latest_complete, verify_checkpoint

    run = tmp_path / "run"
    job = _train(run, tiny_train_base, "train.steps=4", "ckpt.every=2", env={"KNOWLIP_FAULT_ENOSPC_IN_SAVE": "4"})
    partial = run / "checkpoints" / "step_00000004.partial"
    deadline = time.monotonic() + 300
    while not partial.exists() and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    failed_at = time.monotonic()
    out, err = job.communicate(timeout=120)
    took = time.monotonic() - failed_at
    print(f"failure to exit: {took:.1f} s")
    assert job.returncode == 1 and "No space left on device (injected)" in err, out[-2000:] + err[-3000:]
    assert took < 30, took
    assert latest_complete(run / "checkpoints").name == "step_00000002"
    verify_checkpoint(run / "checkpoints" / "step_00000002")
    again = _train(run, tiny_train_base, "train.steps=4", "ckpt.every=2")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0 and "resumed from" in err and "step_00000002 at step 2" in err, out + err[-3000:]
    assert sorted(losses(run)) == [1, 2, 3, 4]

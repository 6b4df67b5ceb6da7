"""What an operator sees and does (issue 23): Ctrl-C, early errors, MLflow run states, the UI, the command line.
Real processes: `knowlip` as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import losses, wait_for_steps

CLI = [sys.executable, "-m", "knowlip.cli"]


def test_ctrl_c_saves_exits_130_and_the_same_command_resumes(local_run, tiny_train_base, tmp_path):
    """The first Ctrl-C (SIGINT to the launcher, as a terminal sends it to the foreground process) saves at the
    end of the step on every rank and exits 130 with one line on how to resume, no traceback; the same command
    then finishes with the uninterrupted run's losses."""
    run = tmp_path / "run"
    command = CLI + ["train", f"run_dir={run}", "dist.nproc_per_node=2", *tiny_train_base, "train.steps=16"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run, 3)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 130, out + err[-3000:]
    assert "saved; run the same command to resume" in out and "Traceback" not in err, out + err[-3000:]
    assert err.count("interrupted: saving a checkpoint") == 1, err[-3000:]
    stopped = max(losses(run))
    assert stopped < 16 and (run / "checkpoints" / f"step_{stopped:08d}" / "meta.json").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert losses(run) == losses(local_run)


def test_ctrl_c_during_pack_is_one_line_and_leaves_no_staging(tmp_path):
    subprocess.run(CLI + ["synth", "synth.num_scenes=32", "synth.size=256"], cwd=tmp_path, check=True,
                   capture_output=True)
    job = subprocess.Popen(CLI + ["pack", "pack.chip.size=16", "pack.chip.stride=16"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = tmp_path / "runs" / "quickstart" / ".shards.staging"
    deadline = time.monotonic() + 120
    while not list(staging.glob("shard-*")) and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, out + err
    assert "knowlip pack: interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not staging.exists() and not (tmp_path / "runs" / "quickstart" / "shards").exists()


def _timed(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120, cwd=cwd)
    return proc, time.monotonic() - started


def test_what_the_launcher_can_know_alone_fails_or_ends_within_seconds(local_run, tiny_train_base, tmp_path):
    """Against a finished 16-step run: each answer comes before any rank, DeepSpeed or MLflow starts (3 s is a
    bound on this box, not a benchmark: starting the ranks alone takes longer), printed once, nothing written."""
    before = {p: p.stat().st_mtime_ns for p in local_run.rglob("*") if p.is_file()}
    common = ["train", f"run_dir={local_run}", "dist.nproc_per_node=2", *tiny_train_base]

    done, took = _timed(*common, "train.steps=16")
    assert done.returncode == 0 and "already finished: 16 of 16 steps" in done.stdout, done.stdout + done.stderr
    assert took < 3, took

    below, took = _timed(*common, "train.steps=8")
    assert below.returncode == 2 and took < 3, (took, below.stderr)
    assert below.stderr.count("train.steps=8 is below the step this run reached (16") == 1, below.stderr

    missing = local_run / "checkpoints" / "step_00000099"
    wrong, took = _timed(*common, f"resume={missing}")
    assert wrong.returncode == 1 and took < 3, (took, wrong.stderr)
    assert f"resume={missing}" in wrong.stderr and "complete checkpoints: " in wrong.stderr
    assert str(local_run / "checkpoints" / "step_00000016") in wrong.stderr, wrong.stderr

    shards, took = _timed(*common[:3], *tiny_train_base, f"data.shards={tmp_path}/nowhere")
    assert shards.returncode == 1 and f"{tmp_path}/nowhere" in shards.stderr and took < 3, (took, shards.stderr)
    assert "Traceback" not in below.stderr + wrong.stderr + shards.stderr
    assert {p: p.stat().st_mtime_ns for p in local_run.rglob("*") if p.is_file()} == before

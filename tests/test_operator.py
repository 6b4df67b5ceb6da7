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

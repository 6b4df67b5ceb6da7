"""Helpers shared by the test modules (fixtures live in conftest.py): configs rooted in a temporary folder, the
in-process tiny run, "straight run equals stop and resume", reading a run's losses, ports and Slurm job ids."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import torch

from knowlip.config import load_config

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp: Path, *overrides: str):
    """Defaults rooted in a temporary folder, plus overrides."""
    base = [f"run_dir={tmp}", f"synth.out_dir={tmp}/scenes", f"pack.inputs=[{tmp}/scenes]",
            f"pack.out_dir={tmp}/shards", f"data.shards={tmp}/shards", "mlflow.enabled=false"]
    return load_config(None, base + list(overrides))


def tiny_in_process(shards: Path, tokenizer: Path, *extra: str) -> list[str]:
    """Overrides of the in-process tiny run (plain engine, 8 chips of 32 px a step, the session's tokenizer);
    `extra` come last and win."""
    return [f"data.shards={shards}", "data.batch_size=8", "data.max_text_len=64", "model.image_size=32",
            "model.queue_size=16", f"model.tokenizer={tokenizer}", "train.engine=plain", "train.progress=false",
            *extra]


def straight_and_resumed(trainer_in, stop_at: int, on_resume=lambda first, resumed: None):
    """Run "a" trains straight through; run "b" stops at `stop_at` with a checkpoint (as a preemption would) and
    a fresh trainer resumes it to the end. `trainer_in(name)` builds the trainer of a run; `on_resume(first,
    resumed)` sees the two trainers of run b before the resumed one trains. Returns (straight, resumed)."""
    straight = trainer_in("a")
    straight.train()
    first = trainer_in("b")
    assert first.train(until=stop_at)["stopped"] == "stop_at"
    resumed = trainer_in("b")
    assert resumed.step == stop_at
    on_resume(first, resumed)
    resumed.train()
    return straight, resumed


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl, checking that no step repeats or goes back."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def deepspeed_zero_stage(ckpt: Path) -> int:
    """The ZeRO stage DeepSpeed itself recorded in a checkpoint's optimizer files (not knowlip's meta.json):
    the stage a run really trained at."""
    import torch

    optim = next((ckpt / "engine").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    return int(torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]["zero_stage"])


HAVE_SLURM = all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in ("slurmctld", "slurmd", "slurmdbd",
                                                                           "munged", "mariadbd"))


def assert_no_secret_in(folder: Path, secrets, *outputs: str) -> None:
    """Not one byte sequence of any secret in any file under `folder` (sqlite stores, pickles included) or in
    any output."""
    for value in secrets:
        for text in outputs:
            assert value not in text, (value, text[-2000:])
        for f in folder.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert value.encode() not in f.read_bytes(), f"{value} found in {f}"


def as_foreground() -> None:
    """preexec_fn of a child that a test will Ctrl-C: SIGINT at its default, as for a terminal's foreground job.
    A test runner started in the background by a non-interactive shell ignores SIGINT, and an ignored signal
    stays ignored across exec: Python would then never raise KeyboardInterrupt in the child."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_steps(run: Path, steps: int, timeout: float = 300) -> float:
    """Until the run logged `steps` steps; returns the deadline, for what follows."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < steps:
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.1)
    return deadline


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    """The job id `knowlip submit` printed (failing with its output when it failed)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.split("submitted job ")[1].split()[0]

"""The training entry of one rank, shared by `knowlip train` (local ranks, torchrun) and Slurm jobs."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from knowlip.launch.local import RankEnv, rank_env
from knowlip.logging_setup import configure_logging
from knowlip.launch.signals import INTERRUPTED_EXIT, StopRequest
from knowlip.launch.slurm import SlurmTask
from knowlip.train.checkpoint import checkpoint_root
from knowlip.train.trainer import Trainer, TrainingStopped


def train_rank(cfg, ranks: RankEnv | None, stop: StopRequest) -> tuple[int, str]:
    """Train (or resume) on this rank. Returns (exit code, outcome): outcome is "finished" (the end, or
    train.stop_at: the job is over either way), "stopped" (a signal; every rank saved: Slurm requeues) or
    "failed"."""
    trainer = Trainer(cfg, ranks, stop)
    last = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    if trainer.step >= last:
        if trainer.rank == 0:
            what = "finished" if last == cfg.train.steps else f"reached train.stop_at={last}"
            print(f"the run in {cfg.run_dir} already {what}: {trainer.step} of {cfg.train.steps} steps "
                  f"(checkpoint {trainer.resumed_from}); nothing to train")
        return 0, "finished"
    started = time.monotonic()
    try:
        result = trainer.train()
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3, "failed"
    outcome = "stopped" if (result["stopped"] or "").startswith("signal") else "finished"
    interrupted = stop.signum == signal.SIGINT
    if trainer.rank == 0:
        if interrupted:
            print(f"interrupted at step {result['steps']} of {cfg.train.steps}: checkpoint {result['checkpoint']} "
                  "saved; run the same command to resume")
        elif result["stopped"]:
            print(f"stopped at step {result['steps']} of {cfg.train.steps} ({result['stopped']}); checkpoint "
                  f"{result['checkpoint']}; run again to resume")
        print(end_summary(cfg, result, trainer.global_batch, time.monotonic() - started))
        if trainer.tracking.run_id is not None:
            from knowlip.track.mlflow_tracker import ui_command

            print(f"MLflow run {trainer.tracking.run_id}; to browse it: {ui_command(cfg)}")
    return (INTERRUPTED_EXIT if interrupted else 0), outcome


def end_summary(cfg, result: dict, global_batch: int, seconds: float) -> str:
    """This job's steps and the run's, the first and last loss of each, wall time, throughput, where things are."""
    history = [h["loss"] for h in result["history"]]
    run_rows = [json.loads(line) for line in Path(result["metrics"]).read_text().splitlines() if line.strip()]
    run_losses = [r["loss"] for r in run_rows if r.get("loss") is not None]
    first_step = result["steps"] - len(history) + 1
    job = (f"this job: steps {first_step}-{result['steps']}, loss {history[0]:.4f} -> {history[-1]:.4f}"
           if history else "this job: no steps")
    run = (f"the run: steps 1-{result['steps']} of {cfg.train.steps}, loss {run_losses[0]:.4f} (step "
           f"{run_rows[0]['step']}) -> {run_losses[-1]:.4f}" if run_losses else "the run: no logged steps")
    rate = len(history) * global_batch / seconds if seconds > 0 else 0.0
    where = (f"metrics {result['metrics']}, checkpoints {checkpoint_root(cfg)}"
             + (f", weights and tokenizer in {cfg.run_dir}" if result["steps"] >= cfg.train.steps else ""))
    head = (f"trained {result['steps']} steps" if result["steps"] >= cfg.train.steps
            else f"at step {result['steps']} of {cfg.train.steps}")
    return (f"{head}; {len(history)} in this job, {seconds:.0f} s, {rate:.1f} samples/s. {job}; {run}. {where}")


class SlurmTrain(SlurmTask):
    """`knowlip train` as a Slurm task (pickled by submitit): the resolved config travels with it."""

    def __init__(self, config_yaml: str, run_dir: Path, max_requeues: int):
        super().__init__(run_dir, max_requeues)
        self.config_yaml = config_yaml

    def run_rank(self, stop: StopRequest) -> str:
        import tempfile

        from knowlip.config import load_config

        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(self.config_yaml)
            f.flush()
            cfg = load_config(f.name)  # validated again, on the node
        ranks = rank_env()
        configure_logging(ranks.rank if ranks else None, cfg.log.level, cfg.log.all_ranks, cfg.log.json)
        code, outcome = train_rank(cfg, ranks, stop)
        if code != 0:
            raise RuntimeError(f"training failed on rank {ranks.rank if ranks else 0} (exit code {code}); see the log")
        return outcome

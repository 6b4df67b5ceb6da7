"""The MLflow side of one training job: rank 0 opens the run (or reopens it on resume) with the job's facts,
local rank 0 of every node samples that node's system metrics into it (with a file store such as the default
sqlite only rank 0's node: one writer to the file), and the run is closed with its report."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
from pathlib import Path

from knowlip.distributed import broadcast_object
from knowlip.redact import redact_text
from knowlip.track.mlflow_tracker import MlflowTracker, SystemMetrics, is_file_store
from knowlip.track.report import write_report


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "-"
    except (OSError, subprocess.TimeoutExpired):
        return "-"


def run_facts(world_size: int, global_batch: int, device_name: str, engine: str, dataset: str) -> dict:
    """Logged once as tags: code, versions, job shape, devices, data."""
    return {"git_commit": git_commit(), "world_size": world_size, "global_batch": global_batch,
            "devices": f"{world_size} x {device_name}", "engine": engine, "dataset": redact_text(dataset),
            **{f"version.{p}": _version(p) for p in ("knowlip", "torch", "deepspeed", "mlflow")}}


def end_status(stopped: str | None, step: int, steps: int) -> tuple[str, str]:
    """(MLflow status, the `knowlip.stop` tag) for how a job ended: FINISHED at train.steps or at a planned
    train.stop_at; SCHEDULED for a stop asked for to be resumed (SIGUSR1, SIGUSR2 before a time limit: a
    requeue follows); KILLED for an interrupt or termination (resumable); FAILED for too many non-finite
    steps (and for an error: Trainer.train)."""
    if step >= steps:
        return "FINISHED", f"finished: {step} of {steps} steps"
    if stopped == "stop_at":
        return "FINISHED", f"planned stop (train.stop_at) at step {step} of {steps}; resumable"
    if stopped == "nonfinite":
        return "FAILED", f"too many non-finite steps in a row at step {step}"
    signal_name = (stopped or "").removeprefix("signal ")
    if signal_name in ("SIGUSR1", "SIGUSR2"):
        return "SCHEDULED", f"{signal_name} at step {step}: saved, to be resumed"
    return "KILLED", f"{signal_name or 'stopped'} at step {step}: saved, resumable"


class RunTracking:
    """`tracker` (rank 0's MlflowTracker, else None) and `system` (this node's sampler, else None)."""

    def __init__(self, tracker: MlflowTracker | None, system: SystemMetrics | None, started: bool = False):
        self.tracker, self.system, self.started = tracker, system, started

    @classmethod
    def start(cls, cfg, rank: int, local_rank: int, run_id: str | None, resumed_step: int | None,
              changes: list[str], facts, engine_config: dict | None) -> "RunTracking":
        """Every rank calls this (a broadcast). `facts` is called for a new run only."""
        if not cfg.mlflow.enabled:
            return cls(None, None, started=True)
        tracker = None
        if rank == 0:
            new_run = run_id is None  # a resume reopens its run: the facts were logged then
            tracker = MlflowTracker.start(cfg, run_id, resumed_step, changes, static=facts() if new_run else None)
            if tracker is not None and new_run and isinstance(engine_config, dict):
                tracker.log_artifact_text(json.dumps(engine_config, indent=1), "deepspeed_config.json")
        shared_id, uri = broadcast_object((tracker.run_id, tracker.uri) if tracker else (None, None))
        system = None
        sampler = rank == 0 if is_file_store(uri or "") else local_rank == 0
        if shared_id and cfg.mlflow.system_metrics and sampler:
            system = SystemMetrics(uri, shared_id, cfg.mlflow.system_interval_s)
        return cls(tracker, system, started=True)

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker is not None else None

    @property
    def uri(self) -> str | None:
        return self.tracker.uri if self.tracker is not None else None

    def log_metrics(self, step: int, row: dict) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(step, row)

    def event(self, name: str, step: int) -> None:
        if self.tracker is not None:
            self.tracker.event(name, step)

    def finish(self, status: str, run_dir: Path, stop: str = "") -> None:
        if self.system is not None:
            self.system.stop()
        if self.tracker is not None:
            self.tracker.finish(status, write_report(run_dir, run_dir / "report"), stop=stop)

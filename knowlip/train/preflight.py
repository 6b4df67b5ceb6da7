"""What a launcher can know alone, checked before any rank, process group, DeepSpeed or MLflow starts: the
shards' index, the checkpoint to resume from, and whether there is anything left to train. Errors come in
about a second, once, instead of after every rank has started (and from every rank)."""

from __future__ import annotations

from pathlib import Path

from knowlip.config import ConfigError
from knowlip.data.shards import load_index
from knowlip.data.storage import storage_options
from knowlip.train.checkpoint import (CHECKPOINTS_DIR, check_fresh_start, checkpoint_root, list_checkpoints,
                                      read_meta, resume_path)
from knowlip.train.metrics import history_files


def _complete_listing(*roots: Path) -> str:
    found = [c.path for root in roots for c in list_checkpoints(root) if c.complete]
    if not found:
        return "no complete checkpoint exists there or in this run"
    return "complete checkpoints: " + ", ".join(str(p) for p in found[-10:])


def resume_step(cfg) -> tuple[Path | None, int | None]:
    """(checkpoint a start would resume from, its step) without verifying it (rank 0 does, on start)."""
    try:
        path = resume_path(cfg)
    except (FileNotFoundError, ValueError) as exc:
        given = Path(cfg.resume)  # where the user pointed, its parent, and this run's own checkpoints
        roots = dict.fromkeys([checkpoint_root(cfg), given.parent, given / CHECKPOINTS_DIR])
        raise FileNotFoundError(f"resume={cfg.resume}: {exc}; {_complete_listing(*roots)}") from None
    meta = read_meta(path) if path is not None else None
    return path, (int(meta["step"]) if meta else None)


def preflight(cfg) -> str | None:
    """Raise (naming the file, key or value) what would fail later; return a message when the run has nothing
    left to do (already at train.steps, or at train.stop_at): the caller exits 0 with it."""
    storage = storage_options(cfg.storage)
    load_index(cfg.data.shards, storage)
    if cfg.eval.shards:
        load_index(cfg.eval.shards, storage)
    check_fresh_start(cfg, history_files(Path(cfg.run_dir)))
    path, step = resume_step(cfg)
    if step is None:
        return None
    if step > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the step this run reached ({step}, {path}): "
                          f"raise train.steps to train on, or use resume=restart or a new run_dir to start over")
    last = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    if step >= last:
        what = "finished" if last == cfg.train.steps else f"reached train.stop_at={last}"
        return (f"the run in {cfg.run_dir} already {what}: {step} of {cfg.train.steps} steps (checkpoint {path}); "
                "nothing to train")
    return None

"""The checkpoint layout, and the only module that knows it.

    <run_dir>/checkpoints/
      latest                      name of the newest complete checkpoint (written last, atomically)
      step_00000120/              one complete checkpoint
        meta.json                 step, time, world size, engine, ZeRO stage, config hash, bytes; "complete": true
        engine/                   the engine's own files (DeepSpeed: every rank's ZeRO partitions)
        state.pt                  global state: step, loader cursor, queues, queue pointer, counters, config,
                                  and room for the MLflow run id and SCIO state
        momentum.pt               the momentum (EMA) weights, full and fp32 (a universal checkpoint drops them)
        rng/rank_00000.pt ...     every RNG of every rank
        tokenizer/, config.yaml   what export needs to stand alone
        universal/                DeepSpeed's universal form, made on demand for a resume at another world size
      step_00000160.partial/      a save in progress (or killed): never resumed, removed by the next save

A save writes into `<name>.partial/`; once every rank has finished (a barrier), rank 0 writes meta.json,
renames the folder to its final name, updates `latest` by rename, and prunes to the newest `ckpt.keep`.
A kill at any point leaves the previous complete checkpoint as the one `resume=auto` finds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "step_"
PARTIAL = ".partial"
LATEST = "latest"


def checkpoint_root(cfg) -> Path:
    return Path(cfg.ckpt.dir) if cfg.ckpt.dir else Path(cfg.run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    complete: bool
    time: float | None
    bytes: int  # as saved (a later universal/ conversion is not counted)
    world_size: int | None
    engine: str | None
    zero_stage: int | None = None  # deepspeed only

    @property
    def engine_label(self) -> str:
        return f"ZeRO-{self.zero_stage}" if self.engine == "deepspeed" else (self.engine or "-")


def read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("complete") else None


def zero_stage_of(meta: dict) -> int | None:
    """The ZeRO stage a deepspeed checkpoint was saved at (saves from before train.zero_stage were all ZeRO-3)."""
    return (meta.get("zero_stage") or 3) if meta.get("engine") == "deepspeed" else None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Every checkpoint folder under root, complete or not, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        if not (path.is_dir() and path.name.startswith(PREFIX)):
            continue
        digits = path.name[len(PREFIX):].removesuffix(PARTIAL)
        if not digits.isdigit():
            continue
        meta = None if path.name.endswith(PARTIAL) else read_meta(path)
        if meta is None:  # a partial folder: walk it (a complete one has its size in meta.json)
            out.append(CheckpointInfo(path, int(digits), False, None, folder_bytes(path), None, None))
        else:
            out.append(CheckpointInfo(path, int(digits), True, meta["time"], meta["bytes"], meta["world_size"],
                                      meta["engine"], zero_stage_of(meta)))
    return sorted(out, key=lambda c: (c.step, c.complete))


def latest_complete(root: Path) -> Path | None:
    complete = [c for c in list_checkpoints(root) if c.complete]
    return complete[-1].path if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder meaning its newest complete checkpoint."""
    path = Path(path)
    if read_meta(path) is not None:
        return path
    for root in (path / "checkpoints", path):
        found = latest_complete(root)
        if found is not None:
            return found
    if path.name.endswith(PARTIAL) or (path / "engine").is_dir():
        raise ValueError(f"{path}: checkpoint is incomplete (its save did not finish); use an earlier one")
    raise FileNotFoundError(f"{path}: no complete checkpoint here")


def resume_path(cfg) -> Path | None:
    """What `resume=auto|none|PATH` means for this run (rank 0 decides, then broadcasts)."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_complete(checkpoint_root(cfg))
    return resolve_checkpoint(cfg.resume)


def begin_save(root: Path, step: int) -> Path:
    """Rank 0: a fresh partial folder for this step (a killed earlier attempt's leftovers removed)."""
    partial = root / (checkpoint_name(step) + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "rng").mkdir(parents=True)
    return partial


def commit_save(partial: Path, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank finished writing: mark complete, publish, point `latest` at it, prune."""
    meta = {**meta, "complete": True, "time": time.time(), "bytes": folder_bytes(partial)}
    _write_atomic(partial / "meta.json", json.dumps(meta, indent=1))
    final = partial.with_name(partial.name.removesuffix(PARTIAL))
    if final.exists():  # the same step saved again (e.g. a re-run after resuming from it): replace it
        old = final.with_name(final.name + ".old")
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old)
    else:
        partial.rename(final)
    _write_atomic(final.parent / LATEST, final.name + "\n")
    prune(final.parent, keep)
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints, and partial folders older than the newest."""
    infos = list_checkpoints(root)
    complete = [c for c in infos if c.complete]
    newest = complete[-1].step if complete else -1
    doomed = [c.path for c in complete[:-keep]] + [c.path for c in infos if not c.complete and c.step < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------------------
# A checkpoint for another world size: DeepSpeed's universal form
# ----------------------------------------------------------------------------------------------------------


def universal_folder(ckpt: Path) -> Path:
    return ckpt / "universal"


def convert_to_universal(ckpt: Path, log=print) -> Path:
    """ds_to_universal into ckpt/universal (once; a finished conversion is marked and reused)."""
    out = universal_folder(ckpt)
    done = out / ".knowlip-complete"
    if done.is_file():
        return out
    meta = read_meta(ckpt)
    if meta is None:
        raise ValueError(f"{ckpt}: not a complete checkpoint")
    if meta.get("engine") != "deepspeed":
        raise ValueError(f"{ckpt}: a {meta.get('engine')} checkpoint has no universal form (only deepspeed)")
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / "engine"),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # stages 1-2 want a Megatron-style version tag our saves do not carry
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"{ckpt}: conversion to a universal checkpoint failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    # Stages 1-2 also write the frozen weights and buffers there (no moments): count what the optimiser trains.
    params = sorted(p.name for p in (out / "zero").iterdir() if (p / "exp_avg.pt").is_file())
    done.write_text(json.dumps({"from_world_size": meta["world_size"], "parameters": params}))
    log(f"converted {ckpt.name} (world size {meta['world_size']}) to a universal checkpoint: {len(params)} "
        f"parameter tensors with their optimizer moments and the step; momentum weights, queues, loader and "
        f"RNG state come from knowlip's own files")
    return out

"""Checkpoints: the layout (the only module that knows a file name in it) and the manager that decides when to
save and what a checkpoint holds.

    <run_dir>/checkpoints/
      latest                      name of the newest complete checkpoint (written last, atomically)
      step_00000120/              one complete checkpoint
        meta.json                 step, time, world size, engine, ZeRO stage, config hash, bytes; "complete": true
        engine/                   the engine's own files (DeepSpeed: every rank's ZeRO partitions)
        state.pt                  global state: each registered component's state_dict() by name (trainer
                                  counters and MLflow run id, loader cursor, model buffers such as the queues,
                                  SCIO totals), and the config with its hash
        momentum.pt               the momentum (EMA) weights, full and fp32 (a universal checkpoint drops them)
        rng/rank_00000.pt ...     every RNG of every rank
        tokenizer/, config.yaml   what export needs to stand alone
        universal/                DeepSpeed's universal form, made on demand for a resume at another world size
      step_00000160.partial/      a save in progress (or killed): never resumed, removed by the next save

A save writes into `<name>.partial/`; once every rank has finished (a barrier), rank 0 writes meta.json,
renames the folder to its final name, updates `latest` by rename, and prunes to the newest `ckpt.keep`.
A kill at any point leaves the previous complete checkpoint as the one `resume=auto` finds.

`CheckpointManager` is what the trainer talks to: components are registered by name (anything with
`state_dict()` / `load_state_dict()`), `due()` says whether a step ends with a save, `save()` and `load()`
write and read every file above, and `plan_resume()` picks the checkpoint to resume from (rank 0 decides,
every rank follows).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

CHECKPOINTS_DIR = "checkpoints"  # in the run folder, unless ckpt.dir says elsewhere
PREFIX = "step_"
PARTIAL = ".partial"
LATEST = "latest"
META = "meta.json"
STATE = "state.pt"
MOMENTUM = "momentum.pt"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
RNG = "rng"
ENGINE_TAG = "engine"  # the engine's own files: <checkpoint>/engine/ (DeepSpeed's "tag")
UNIVERSAL_TAG = "universal"  # DeepSpeed's universal form of them, made on demand

log = logging.getLogger(__name__)


def checkpoint_root(cfg) -> Path:
    return Path(cfg.ckpt.dir) if cfg.ckpt.dir else Path(cfg.run_dir) / CHECKPOINTS_DIR


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
        meta = json.loads((path / META).read_text())
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
    for root in (path / CHECKPOINTS_DIR, path):
        found = latest_complete(root)
        if found is not None:
            return found
    if path.name.endswith(PARTIAL) or (path / ENGINE_TAG).is_dir():
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
    (partial / RNG).mkdir(parents=True)
    return partial


def commit_save(partial: Path, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank finished writing: mark complete, publish, point `latest` at it, prune."""
    meta = {**meta, "complete": True, "time": time.time(), "bytes": folder_bytes(partial)}
    _write_atomic(partial / META, json.dumps(meta, indent=1))
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
    return folder / RNG / f"rank_{rank:05d}.pt"


def plain_engine_file(folder: Path, tag: str = ENGINE_TAG) -> Path:
    """The plain engine's one file (weights, optimiser, bf16 masters) in a checkpoint."""
    return folder / tag / "plain_engine.pt"


# ----------------------------------------------------------------------------------------------------------
# A checkpoint for another world size: DeepSpeed's universal form
# ----------------------------------------------------------------------------------------------------------


def universal_folder(ckpt: Path) -> Path:
    return ckpt / UNIVERSAL_TAG


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
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / ENGINE_TAG),
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


# ----------------------------------------------------------------------------------------------------------
# The manager: when to save, what a checkpoint holds
# ----------------------------------------------------------------------------------------------------------


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RankRng:
    """Every RNG a step draws from (masking and hard negatives use torch's), one file per rank: resumes are
    bit-exact at the same world size; at another, each rank is seeded afresh from (seed, rank, step)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def reseed(self, step: int = 0) -> None:
        import numpy as np
        import torch

        mixed = (self.seed * 1_000_003 + self.rank * 7_919 + step) % 2**31
        random.seed(mixed)
        np.random.seed(mixed)
        torch.manual_seed(mixed)

    def state_dict(self) -> dict:
        import numpy as np
        import torch

        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        import numpy as np
        import torch

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ModelBuffers:
    """The model's buffers (queues, queue pointer): a universal checkpoint would drop them."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.named_buffers()}

    def load_state_dict(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(state[name])


def _components_of(state: dict) -> dict:
    """The per-component states of a state.pt; saves from before the manager kept them flat."""
    if "components" in state:
        return state["components"]
    return {"trainer": {k: state.get(k) for k in ("step", "nonfinite_skipped", "nonfinite_in_a_row", "mlflow_run_id")},
            "loader": state["loader"], "buffers": state["buffers"], "scio": state.get("scio") or {}}


def plan_resume(cfg, rank: int, world_size: int) -> tuple[Path | None, bool]:
    """(checkpoint to resume from or None, whether through its universal form). Rank 0 picks it (and converts
    it when the world size changed); every rank follows (a broadcast: every rank calls this)."""
    from knowlip.distributed import broadcast_object

    plan, error = (None, False), None
    if rank == 0:
        try:
            plan = _pick_resume(cfg, world_size)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            error = exc
    plan, error = broadcast_object((plan, error))
    if error is not None:
        raise error
    return plan


def _pick_resume(cfg, world_size: int) -> tuple[Path | None, bool]:
    path = resume_path(cfg)
    if path is None:
        return None, False
    meta = read_meta(path)
    if meta["engine"] != cfg.train.engine:
        raise ValueError(f"{path}: written by the {meta['engine']} engine, but train.engine={cfg.train.engine}")
    stage = zero_stage_of(meta)
    if stage is not None and stage != cfg.train.zero_stage:
        raise ValueError(f"{path}: saved at ZeRO stage {stage}, but train.zero_stage={cfg.train.zero_stage}; "
                         f"DeepSpeed cannot load one stage's files at another (not even in the universal "
                         f"form): resume with train.zero_stage={stage}")
    universal = meta["world_size"] != world_size
    if universal:
        print(f"knowlip: {path.name} was saved by {meta['world_size']} rank(s); this job has "
              f"{world_size}: converting it to a universal checkpoint", file=sys.stderr)
        convert_to_universal(path, log=lambda m: print(f"knowlip: {m}", file=sys.stderr))
    return path, universal


class CheckpointManager:
    """Owns the checkpoints of one run: when a step ends with a save (`ckpt.every`, forced saves), what a save
    holds (the engine's files, the momentum weights, every rank's RNG, the registered components, tokenizer and
    config) and where each file goes. Every rank calls save and load (they contain collectives)."""

    def __init__(self, cfg, engine, tokenizer, rank: int, world_size: int, global_batch: int):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        self.root = checkpoint_root(cfg)
        self.rng = RankRng(cfg.seed, rank)
        self.components: dict[str, Stateful] = {}

    def register(self, name: str, component: Stateful) -> None:
        self.components[name] = component

    def due(self, step: int, forced: bool) -> bool:
        """A save ends this step: forced (a stop, the end of the run) or every `ckpt.every` steps."""
        every = self.cfg.ckpt.every
        return forced or step == self.cfg.train.steps or bool(every and step % every == 0)

    def save(self, step: int, on_rank_files_written: Callable[[Path], None] = lambda _: None) -> Path:
        """Every rank writes its part into a partial folder; rank 0 publishes it once all have finished.
        `on_rank_files_written` runs on every rank once its own files are written (a fault-injection point)."""
        import torch

        from knowlip.config import config_hash, to_yaml
        from knowlip.distributed import barrier

        partial = self.root / (checkpoint_name(step) + PARTIAL)
        if self.rank == 0:
            begin_save(self.root, step)
        barrier()
        self.engine.save(partial, ENGINE_TAG)
        torch.save(self.rng.state_dict(), rng_file(partial, self.rank))
        on_rank_files_written(partial)
        momentum = self.engine.momentum_state()  # a collective: every rank takes part
        if self.rank == 0:
            torch.save(momentum, partial / MOMENTUM)
            state = {"components": {name: c.state_dict() for name, c in self.components.items()},
                     "config": _plain(self.cfg), "config_hash": config_hash(self.cfg)}
            torch.save(state, partial / STATE)
            self.tokenizer.save_pretrained(partial / TOKENIZER)
            (partial / CONFIG).write_text(to_yaml(self.cfg))
        barrier()
        final = self.root / checkpoint_name(step)
        if self.rank == 0:
            cfg = self.cfg
            meta = {"step": step, "world_size": self.world_size, "engine": cfg.train.engine,
                    "zero_stage": cfg.train.zero_stage if cfg.train.engine == "deepspeed" else None,
                    "config_hash": config_hash(cfg), "global_batch": self.global_batch}
            final = commit_save(partial, meta, cfg.ckpt.keep)
            log.info("saved checkpoint %s", final)
        barrier()
        return final

    def load(self, path: Path, universal: bool) -> dict:
        """Restore the engine, the momentum weights, every component and this rank's RNG from `path`. Returns the
        config the checkpoint was saved with (a plain dict)."""
        import torch

        self.engine.load(path, UNIVERSAL_TAG if universal else ENGINE_TAG)
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        self.engine.load_momentum_state(torch.load(path / MOMENTUM, map_location="cpu", mmap=True))
        components = _components_of(state)
        for name, component in self.components.items():
            component.load_state_dict(components[name])
        rng = rng_file(path, self.rank)
        if not universal and rng.is_file():
            self.rng.load_state_dict(torch.load(rng, weights_only=False))
        else:
            self.rng.reseed(int(components["trainer"]["step"]))
        return state["config"]


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def copy_for_export(checkpoint: Path, out: Path) -> None:
    """The config and tokenizer a checkpoint carries, copied beside exported weights."""
    shutil.copyfile(checkpoint / CONFIG, out / CONFIG)
    if (out / TOKENIZER).resolve() != (checkpoint / TOKENIZER).resolve():
        shutil.copytree(checkpoint / TOKENIZER, out / TOKENIZER, dirs_exist_ok=True)


def load_global_state(checkpoint: Path) -> tuple[dict, dict[str, "torch.Tensor"]]:
    """(components' states, momentum weights) of a checkpoint, on the CPU."""
    import torch

    state = torch.load(checkpoint / STATE, map_location="cpu", weights_only=False)
    return _components_of(state), torch.load(checkpoint / MOMENTUM, map_location="cpu")

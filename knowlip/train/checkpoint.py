"""Checkpoints: the layout (the only module that knows a file name in it) and the manager that decides when to
save and what a checkpoint holds.

    <run_dir>/checkpoints/
      latest                      name of the newest complete checkpoint (written last, atomically)
      step_00000120/              one complete checkpoint
        meta.json                 step, time, world size, engine, ZeRO stage and parameter layout, config hash,
                                  bytes, the sha256 of every other file; "complete": true
        engine/                   the engine's own files (DeepSpeed: every rank's ZeRO partitions)
        state.pt                  global state: each registered component's state_dict() by name (trainer
                                  counters and MLflow run id, loader cursor, model buffers such as the queues,
                                  SCIO totals), and the config with its hash
        momentum.pt               the momentum (EMA) weights, full and fp32 (a universal checkpoint drops them)
        rng/rank_00000.pt ...     every RNG of every rank
        tokenizer/, config.yaml   what export needs to stand alone
        universal/                DeepSpeed's universal form, made on demand for a resume at another world size
      step_00000160.partial/      a save in progress (or killed): never resumed, removed by the next save
      abandoned/<when>-<why>/     checkpoints (and metrics rows) of a branch the run left: kept, never resumed

A save writes into `<name>.partial/`; once every rank has finished (a barrier), rank 0 writes meta.json
(with the save's sequence number), renames the folder to its final name, updates `latest` by rename, and
prunes to the `ckpt.keep` newest by save order (never the save just made). A kill at any point leaves the
previous complete checkpoint as the one `resume=auto` finds.

The run's history: `resume=auto` takes the checkpoint `latest` names (else the newest complete one by save
order), falling back to the one saved before it when a checkpoint fails its check. Resuming from any other
checkpoint starts a new branch: the checkpoints saved after it are moved to abandoned/ first, so that neither
a requeue nor pruning can pick them. `resume=none` is refused where a history exists; `resume=restart` moves
that history aside and starts afresh.

Checkpoints are data, not code: knowlip's own files are read with `weights_only=True` (tensors, numbers,
strings, lists, dicts; a pickled payload cannot run), and DeepSpeed's files, which DeepSpeed unpickles, are
opened only after every file of the checkpoint matched the sha256 that meta.json recorded at save
(`verify_checkpoint`): resume, export, eval and `ckpt universal` refuse, naming the file, anything else.

`CheckpointManager` is what the trainer talks to: components are registered by name (anything with
`state_dict()` / `load_state_dict()`), `due()` says whether a step ends with a save, `save()` and `load()`
write and read every file above, and `plan_resume()` picks the checkpoint to resume from (rank 0 decides,
every rank follows).
"""

from __future__ import annotations

import hashlib
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
UNIVERSAL_LATEST = "latest_universal"  # the tag file ds_to_universal writes beside it (text; we name the tag)
NOT_SAVED = (META, UNIVERSAL_TAG, UNIVERSAL_LATEST)  # top-level names a save's digests leave out

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
    seq: int = 0  # save order within the run (saves from before it: 0, ordered by time)

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
                                      meta["engine"], zero_stage_of(meta), int(meta.get("seq", 0))))
    return sorted(out, key=save_order)


def save_order(c: CheckpointInfo) -> tuple:
    """Complete checkpoints in the order they were saved (not by step: a run that went back to an earlier
    checkpoint saves lower steps later), then incomplete ones by step."""
    return (not c.complete, c.seq, c.time or 0.0, c.step)


def latest_complete(root: Path) -> Path | None:
    """The checkpoint `latest` names when it is complete, else the newest complete one by save order."""
    complete = [c for c in list_checkpoints(root) if c.complete]
    named = _latest_named(root)
    if named is not None and any(c.path == named for c in complete):
        return named
    return complete[-1].path if complete else None


def _latest_named(root: Path) -> Path | None:
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return root / name if name.startswith(PREFIX) and "/" not in name else None


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
    """What `resume=auto|none|restart|PATH` means for this run, before any checkpoint is checked."""
    if cfg.resume in ("none", "restart"):
        return None
    if cfg.resume == "auto":
        return latest_complete(checkpoint_root(cfg))
    return resolve_checkpoint(cfg.resume)


def resume_candidates(root: Path) -> list[Path]:
    """resume=auto's choices in order: what `latest` names, then every other complete checkpoint, newest saved
    first (the fall-backs when one fails its check)."""
    first = latest_complete(root)
    if first is None:
        return []
    rest = [c.path for c in reversed(list_checkpoints(root)) if c.complete and c.path != first]
    return [first, *rest]


# ----------------------------------------------------------------------------------------------------------
# The run's history: branches, a fresh start
# ----------------------------------------------------------------------------------------------------------

ABANDONED = "abandoned"  # under the checkpoint root
ABANDONED_NOTE = "abandoned.json"


def history_exists(root: Path, files: list[Path]) -> bool:
    return bool(list_checkpoints(root)) or any(f.is_file() and f.stat().st_size for f in files)


def check_fresh_start(cfg, files: list[Path]) -> None:
    """resume=none where the run already has checkpoints or metrics: refused (the new steps would interleave
    with the old ones, and pruning would mix the two)."""
    root = checkpoint_root(cfg)
    if cfg.resume == "none" and history_exists(root, files):
        raise ValueError(f"{cfg.run_dir}: resume=none, but this run already has a history (checkpoints in {root} "
                         "or metrics.jsonl); use a new run_dir, resume=auto to continue it, or resume=restart to "
                         f"move that history to {root / ABANDONED} and start afresh")


def set_aside(root: Path, paths: list[Path], why: str, note: dict) -> Path | None:
    """Move checkpoints (and run files) into a new folder under <root>/abandoned/; returns it (None: nothing)."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    folder = root / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
    n = 1
    while folder.exists():
        folder, n = folder.with_name(f"{folder.name.rsplit('.', 1)[0]}.{n}"), n + 1
    folder.mkdir(parents=True)
    for path in paths:
        path.rename(folder / path.name)
    _write_atomic(folder / ABANDONED_NOTE, json.dumps({**note, "time": time.time(), "moved": [p.name for p in paths]},
                                                      indent=1))
    return folder


def start_branch(root: Path, chosen: Path, reason: str) -> Path | None:
    """Resuming from `chosen`: every checkpoint saved after it (and any partial save) is moved aside, and
    `latest` names `chosen`, so that the new branch is the only one a later resume or prune sees. A checkpoint
    of another run (or folder) starts this root's history afresh: all of its checkpoints are moved aside."""
    infos = list_checkpoints(root)
    mine = next((c for c in infos if c.path.resolve() == chosen.resolve()), None)
    if mine is not None:
        later = [c.path for c in infos if c is not mine and save_order(c) > save_order(mine)]
    else:
        later = [c.path for c in infos]
    folder = set_aside(root, later, f"after-{chosen.name}", {"reason": reason, "resumed_from": str(chosen)})
    if folder is not None:
        if mine is not None:
            _write_atomic(root / LATEST, chosen.name + "\n")
        else:
            (root / LATEST).unlink(missing_ok=True)
    return folder


def abandoned_branches(root: Path) -> list[tuple[Path, dict, list[CheckpointInfo]]]:
    """(folder, its note, its checkpoints) for every set-aside branch, oldest first."""
    out = []
    for folder in sorted((root / ABANDONED).glob("*")) if (root / ABANDONED).is_dir() else []:
        try:
            note = json.loads((folder / ABANDONED_NOTE).read_text())
        except (OSError, ValueError):
            note = {}
        out.append((folder, note, list_checkpoints(folder)))
    return out


def begin_save(root: Path, step: int) -> Path:
    """Rank 0: a fresh partial folder for this step (a killed earlier attempt's leftovers removed)."""
    partial = root / (checkpoint_name(step) + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    (partial / RNG).mkdir(parents=True)
    return partial


def commit_save(partial: Path, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank finished writing: record every file's sha256, mark complete, publish, point
    `latest` at it, prune."""
    done = [c.seq for c in list_checkpoints(partial.parent) if c.complete]
    meta = {**meta, "complete": True, "time": time.time(), "seq": max(done, default=0) + 1,
            "bytes": folder_bytes(partial), "files": file_digests(partial)}
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
    """Remove all but the `keep` newest complete checkpoints by save order (the save just made is the newest),
    and partial folders (the run lock means no other save is in progress)."""
    infos = list_checkpoints(root)
    complete = [c for c in infos if c.complete]
    doomed = [c.path for c in complete[:-keep]] + [c.path for c in infos if not c.complete]
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


class UntrustedCheckpoint(ValueError):
    """A checkpoint file that is not what knowlip saved (or a checkpoint without checksums)."""


TRUST_UNVERIFIED = "KNOWLIP_TRUST_UNVERIFIED_CHECKPOINTS"  # =1: load saves from before checksums, unverified


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path, skip: tuple[str, ...]) -> list[str]:
    """Every file below `folder` by relative path, sorted; `skip`: top-level names left out."""
    return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*")
                  if f.is_file() and f.relative_to(folder).parts[0] not in skip)


def file_digests(folder: Path, skip: tuple[str, ...] = NOT_SAVED) -> dict[str, str]:
    """sha256 of every file below `folder` by relative path."""
    return {name: sha256_file(folder / name) for name in _files(folder, skip)}


def _check_digests(folder: Path, expected: dict[str, str], skip: tuple[str, ...]) -> None:
    actual = set(_files(folder, skip))
    for name in sorted(set(expected) | actual):
        if name not in actual:
            raise UntrustedCheckpoint(f"{folder / name}: missing (the save recorded it)")
        if name not in expected:
            raise UntrustedCheckpoint(f"{folder / name}: not part of the checkpoint as saved; refusing to load it "
                                      "(remove the file if you put it there)")
        if sha256_file(folder / name) != expected[name]:
            raise UntrustedCheckpoint(f"{folder / name}: its sha256 does not match the one recorded at save; the "
                                      "file was changed after the save, refusing to load it")


def verify_checkpoint(path: Path) -> None:
    """Every file of a complete checkpoint matches the sha256 recorded in its meta.json (and its universal form,
    if made, the digests recorded at conversion); raises UntrustedCheckpoint naming the first that does not."""
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"{path}: not a complete checkpoint")
    if "files" not in meta:
        if os.environ.get(TRUST_UNVERIFIED) == "1":
            log.warning("%s: no checksums recorded; loading it unverified (%s=1)", path, TRUST_UNVERIFIED)
            return
        raise UntrustedCheckpoint(f"{path / META}: no checksums recorded (saved by an older knowlip, or edited); "
                                  f"set {TRUST_UNVERIFIED}=1 to load it anyway if you trust where it came from")
    _check_digests(path, meta["files"], NOT_SAVED)
    marker = universal_folder(path) / UNIVERSAL_MARKER
    if marker.is_file():
        _check_digests(universal_folder(path), json.loads(marker.read_text()).get("files", {}), (UNIVERSAL_MARKER,))


def load_data(path: Path, map_location="cpu", **kwargs):
    """A file knowlip wrote with torch.save, read as data (weights_only: no pickled code can run)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


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


UNIVERSAL_MARKER = ".knowlip-complete"


def convert_to_universal(ckpt: Path, log=print) -> Path:
    """ds_to_universal into ckpt/universal (once; a finished conversion is marked and reused). The checkpoint is
    verified first: the converter unpickles DeepSpeed's files."""
    verify_checkpoint(ckpt)
    out = universal_folder(ckpt)
    done = out / UNIVERSAL_MARKER
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
    done.write_text(json.dumps({"from_world_size": meta["world_size"], "parameters": params,
                                "files": file_digests(out, skip=(UNIVERSAL_MARKER,))}))
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
        """Tensors, numbers and tuples only, so that the file loads as data."""
        import numpy as np
        import torch

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        import numpy as np
        import torch

        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
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


@dataclass
class ResumePlan:
    path: Path | None = None  # None: a fresh start
    universal: bool = False  # through the universal form (another world size)
    abandoned: Path | None = None  # where the checkpoints of the branch left behind went


def plan_resume(cfg, rank: int, world_size: int, run_files: list[Path]) -> ResumePlan:
    """Where this job starts. Rank 0 decides (checks, falls back, moves an abandoned branch aside, converts for
    another world size); every rank follows (a broadcast: every rank calls this). `run_files`: the run's own
    history files (metrics), which resume=none refuses to mix with and resume=restart moves aside."""
    from knowlip.distributed import broadcast_object

    plan, error = ResumePlan(), None
    if rank == 0:
        try:
            plan = _pick_resume(cfg, world_size, run_files)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            error = exc
    plan, error = broadcast_object((plan, error))
    if error is not None:
        raise error
    return plan


def _say(message: str) -> None:
    log.warning("%s", message)


def _pick_resume(cfg, world_size: int, run_files: list[Path]) -> ResumePlan:
    root = checkpoint_root(cfg)
    if cfg.resume == "none":
        check_fresh_start(cfg, run_files)
        return ResumePlan()
    if cfg.resume == "restart":
        moved = set_aside(root, [c.path for c in list_checkpoints(root)] + list(run_files), "restart",
                          {"reason": "resume=restart"})
        (root / LATEST).unlink(missing_ok=True)
        if moved is not None:
            _say(f"resume=restart: the run's earlier checkpoints and metrics were moved to {moved}")
        return ResumePlan()
    explicit = cfg.resume != "auto"
    candidates = [resolve_checkpoint(cfg.resume)] if explicit else resume_candidates(root)
    for n, path in enumerate(candidates):
        try:
            universal = _prepare_resume(cfg, path, world_size)
        except (UntrustedCheckpoint, RuntimeError) as exc:  # damaged, or its conversion failed
            if explicit or n + 1 == len(candidates):
                raise
            _say(f"{path.name} cannot be resumed ({exc}); falling back to {candidates[n + 1].name}, the one saved "
                 "before it")
            continue
        reason = f"resume={cfg.resume}" if explicit else f"resume=auto fell back past {n} damaged checkpoint(s)"
        abandoned = start_branch(root, path, reason)
        if abandoned is not None:
            _say(f"resuming from {path.name} starts a new branch: what was saved after it is kept in {abandoned} "
                 "(never resumed)")
        return ResumePlan(path, universal, abandoned)
    return ResumePlan()


def _prepare_resume(cfg, path: Path, world_size: int) -> bool:
    """Check `path` against this job (engine, stage) and verify it (converting it for another world size).
    Returns whether the resume goes through the universal form."""
    meta = read_meta(path)
    if meta["engine"] != cfg.train.engine:
        raise ValueError(f"{path}: written by the {meta['engine']} engine, but train.engine={cfg.train.engine}")
    stage = zero_stage_of(meta)
    if stage is not None and cfg.train.zero_stage not in ("auto", stage):  # auto takes the saved stage
        raise ValueError(f"{path}: saved at ZeRO stage {stage}, but train.zero_stage={cfg.train.zero_stage}; "
                         f"DeepSpeed cannot load one stage's files at another (not even in the universal "
                         f"form): resume with train.zero_stage={stage}")
    if stage is not None:
        _check_param_layout(cfg, path, meta, stage)
    universal = meta["world_size"] != world_size
    if universal:  # the conversion verifies the checkpoint first
        _say(f"{path.name} was saved by {meta['world_size']} rank(s); this job has {world_size}: converting it to "
             "a universal checkpoint")
        convert_to_universal(path, log=_say)
    else:
        verify_checkpoint(path)  # before any rank lets DeepSpeed unpickle its files
    return universal


def _check_param_layout(cfg, path: Path, meta: dict, stage: int) -> None:
    """DeepSpeed's files hold the weights in one layout (knowlip.train.param_layout); a job resumes in it."""
    from knowlip.train.param_layout import FLAT_LAYOUT, PER_PARAMETER

    saved = meta.get("param_layout") or PER_PARAMETER  # saves from before train.zero3_gather=flat: per parameter
    wanted = FLAT_LAYOUT if stage == 3 and cfg.train.zero3_gather == "flat" else PER_PARAMETER
    if saved == wanted:
        return
    if saved == FLAT_LAYOUT:
        raise ValueError(f"{path}: saved with train.zero3_gather=flat (each block's weights in flat parameters), "
                         f"but train.zero3_gather={cfg.train.zero3_gather}; DeepSpeed cannot load one layout's "
                         "files in another: resume with train.zero3_gather=flat")
    raise ValueError(f"{path}: saved with one parameter per weight, but train.zero3_gather=flat; DeepSpeed cannot "
                     "load one layout's files in another: resume with train.zero3_gather=block (or module)")


class CheckpointManager:
    """Owns the checkpoints of one run: when a step ends with a save (`ckpt.every`, forced saves), what a save
    holds (the engine's files, the momentum weights, every rank's RNG, the registered components, tokenizer and
    config) and where each file goes. Every rank calls save and load (they contain collectives)."""

    def __init__(self, cfg, engine, tokenizer, rank: int, world_size: int, global_batch: int,
                 notes: dict | None = None):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        self.notes = notes or {}  # facts of the job written into every meta.json (e.g. why this ZeRO stage)
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
                    "param_layout": getattr(self.engine, "param_layout", None),
                    "config_hash": config_hash(cfg), "global_batch": self.global_batch, **self.notes}
            final = commit_save(partial, meta, cfg.ckpt.keep)
            log.info("saved checkpoint %s", final)
        barrier()
        return final

    def load(self, path: Path, universal: bool) -> dict:
        """Restore the engine, the momentum weights, every component and this rank's RNG from `path`. Returns the
        config the checkpoint was saved with (a plain dict)."""
        self.engine.load(path, UNIVERSAL_TAG if universal else ENGINE_TAG)
        state = load_data(path / STATE)
        self.engine.load_momentum_state(load_data(path / MOMENTUM, mmap=True))
        components = _components_of(state)
        for name, component in self.components.items():
            component.load_state_dict(components[name])
        rng = rng_file(path, self.rank)
        if not universal and rng.is_file():
            self.rng.load_state_dict(load_data(rng))
        else:
            self.rng.reseed(int(components["trainer"]["step"]))
        return state["config"]


def _plain(cfg) -> dict:
    from knowlip.config import public_tree

    return public_tree(cfg)


def copy_for_export(checkpoint: Path, out: Path) -> None:
    """The config and tokenizer a checkpoint carries, copied beside exported weights."""
    shutil.copyfile(checkpoint / CONFIG, out / CONFIG)
    if (out / TOKENIZER).resolve() != (checkpoint / TOKENIZER).resolve():
        shutil.copytree(checkpoint / TOKENIZER, out / TOKENIZER, dirs_exist_ok=True)


def load_global_state(checkpoint: Path) -> tuple[dict, dict[str, "torch.Tensor"]]:
    """(components' states, momentum weights) of a checkpoint, on the CPU."""
    return _components_of(load_data(checkpoint / STATE)), load_data(checkpoint / MOMENTUM)

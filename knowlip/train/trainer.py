"""The trainer: one readable orchestrator over the engine, the loader and the checkpoints.

One step: raw chips to the device -> fused SAR normalisation -> momentum update -> forward (ITC, ITM,
reconstruction) -> every rank agrees on (stop requested?, loss non-finite?) -> backward -> engine step.
After the step: metrics (rank 0, <run_dir>/metrics.jsonl), then a checkpoint when one is due (`ckpt.every`,
`train.stop_at`, the end, a signal, too many non-finite steps in a row).
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from knowlip.config import accumulation_steps, config_changes, config_hash, schedule_steps, to_yaml
from knowlip.data.loader import StreamingLoader, build_loader
from knowlip.data.shards import ShardIndex, load_index
from knowlip.data.storage import storage_options
from knowlip.eval.zero_shot import run_eval, scalars
from knowlip.launch.local import RankEnv, free_port, resolve_device
from knowlip.launch.signals import StopRequest
from knowlip.model.build import build_model
from knowlip.model.flops import peak_flops, training_flops_per_sample
from knowlip.ops.sar_norm import batch_params, normalise_batch
from knowlip.text.tokenizer import CaptionTokenizer, load_tokenizer, train_wordpiece
from knowlip.train import checkpoint as ckpt
from knowlip.train import scio
from knowlip.train.engine import (barrier, broadcast_object, build_engine, check_deepspeed_section,
                                  init_process_group)
from knowlip.track.mlflow_tracker import MlflowTracker, SystemMetrics
from knowlip.track.report import write_report
from knowlip.train.export import export_checkpoint
from knowlip.train.schedule import alpha_at, lr_at

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device name, for MFU (anchors.md); unknown devices report no MFU.
class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved first."""


def shard_captions(index: ShardIndex) -> list[str]:
    """Every caption of a shard folder (one pass, chips not decoded), for training a tokenizer."""
    loader = StreamingLoader(index, batch_size=256, drop_last=False, decode_chip=False)
    return [c for batch in loader for c in batch["captions"]]


def rng_state() -> dict:
    """Every RNG a step draws from (masking and hard negatives use torch's), for bit-exact resumes."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Each rank draws its own masks and negatives; a fresh seed for a resume at another world size."""
    mixed = (seed * 1_000_003 + rank * 7_919 + step) % 2**31
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def check_data_fits(cfg, index: ShardIndex, world_size: int) -> None:
    """Fail before building anything when the shards cannot feed this model and batch."""
    channels = {len(b.split("+")) for b in index.info.get("report", {}).get("bands", {})}
    if channels and channels != {cfg.model.in_channels}:
        raise ValueError(f"{index.root}: chips have {sorted(channels)} channel(s) but model.in_channels="
                         f"{cfg.model.in_channels}")
    if index.total_samples < cfg.data.batch_size * world_size:
        raise ValueError(f"{index.root}: {index.total_samples} samples are fewer than one batch "
                         f"(data.batch_size={cfg.data.batch_size} x {world_size} rank(s))")


class _Meter:
    """Throughput over the window since the last log line: samples/s, TFLOP/s, MFU, data-wait share."""

    def __init__(self, flops_per_sample: int, peak: float | None, world_size: int):
        self.flops_per_sample, self.peak, self.world_size = flops_per_sample, peak, world_size
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.data_time, self._fetch = time.perf_counter(), 0, 0.0, time.perf_counter()

    def fetch_started(self) -> None:
        self._fetch = time.perf_counter()

    def fetched(self, samples: int) -> None:
        self.data_time += time.perf_counter() - self._fetch
        self.samples += samples * self.world_size

    def window(self) -> dict:
        """samples/s and TFLOP/s of the whole job; MFU per device."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        flops = self.flops_per_sample * self.samples / elapsed
        out = {"samples_per_s": round(self.samples / elapsed, 2), "tflops_per_s": round(flops / 1e12, 4),
               "mfu": round(flops / self.world_size / self.peak, 4) if self.peak else None,
               "data_time_share": round(self.data_time / elapsed, 3)}
        self._reset()
        return out


class Trainer:
    def __init__(self, cfg, renv: RankEnv | None = None, stop: StopRequest | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        renv = renv or RankEnv(0, 1, 0, 1, "127.0.0.1", free_port())
        if cfg.train.engine == "plain" and renv.world_size > 1:
            raise ValueError("train.engine=plain runs one process; use train.engine=deepspeed for several ranks")
        # Everything that can fail on the config or the data fails here, before any process group exists.
        self.accumulation = accumulation_steps(cfg, renv.world_size)
        check_deepspeed_section(OmegaConf.to_container(cfg.deepspeed, resolve=True), cfg.train.zero_stage)
        storage = storage_options(cfg.storage)
        self.index = load_index(cfg.data.shards, storage)  # read once per rank; a bad path or URL fails now
        check_data_fits(cfg, self.index, renv.world_size)
        self.eval_index = load_index(cfg.eval.shards, storage) if cfg.eval.shards else None
        self.device = resolve_device(cfg.train.device, renv.local_rank)
        if self.device.type == "cpu" and renv.local_world_size > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // renv.local_world_size))
        if cfg.train.engine == "deepspeed":
            init_process_group(renv, self.device, cfg.dist.backend, cfg.dist.timeout_s)
        self.rank, self.world_size, self.local_rank = renv.rank, renv.world_size, renv.local_rank
        self.stop = stop or StopRequest()
        bf16 = cfg.train.precision in ("bf16", "bf16_weights") or (cfg.train.precision == "auto" and
                                                                    self.device.type == "cuda")

        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from, universal = self._resume_plan()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.tokenizer = self._tokenizer()
        self.text = CaptionTokenizer(self.tokenizer, cfg.data.max_text_len)
        self.loader = build_loader(cfg.data, self.rank, self.world_size, tokenizer=self.text,
                                   pin_memory=self.device.type == "cuda", index=self.index)
        model = build_model(cfg.model, self.tokenizer)
        model.vision.activation_checkpointing = model.text.activation_checkpointing = cfg.train.activation_checkpointing
        if cfg.train.compile:
            for block in [*model.vision.blocks, *model.text.layers]:
                block.compile()
        self.engine = build_engine(model, cfg, self.device, bf16, self.accumulation, universal)
        self.model = self.engine.module
        self.step, self.nonfinite_skipped, self.nonfinite_in_a_row = 0, 0, 0
        self.scio_stats = scio.ScioStats()
        self.norm_params = None
        self.resumed_from: Path | None = None
        self.mlflow_run_id: str | None = None
        self.resume_changes: list[str] = []
        seed_rank(cfg.seed, self.rank)
        if resume_from is not None:
            self.load_checkpoint(resume_from, universal)
        self.tracker, self.system_metrics = self._start_tracking()

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.world_size * self.accumulation

    # -- building blocks -------------------------------------------------------------------------------------

    def _resume_plan(self) -> tuple[Path | None, bool]:
        """Rank 0 picks the checkpoint (and converts it when the world size changed); every rank follows."""
        plan, error = (None, False), None
        if self.rank == 0:
            try:
                path = ckpt.resume_path(self.cfg)
                if path is not None:
                    meta = ckpt.read_meta(path)
                    if meta["engine"] != self.cfg.train.engine:
                        raise ValueError(f"{path}: written by the {meta['engine']} engine, but train.engine="
                                         f"{self.cfg.train.engine}")
                    stage = ckpt.zero_stage_of(meta)
                    if stage is not None and stage != self.cfg.train.zero_stage:
                        raise ValueError(f"{path}: saved at ZeRO stage {stage}, but train.zero_stage="
                                         f"{self.cfg.train.zero_stage}; DeepSpeed cannot load one stage's files at "
                                         f"another (not even in the universal form): resume with "
                                         f"train.zero_stage={stage}")
                    universal = meta["world_size"] != self.world_size
                    if universal:
                        print(f"knowlip: {path.name} was saved by {meta['world_size']} rank(s); this job has "
                              f"{self.world_size}: converting it to a universal checkpoint", file=sys.stderr)
                        ckpt.convert_to_universal(path, log=lambda m: print(f"knowlip: {m}", file=sys.stderr))
                    plan = (path, universal)
            except (ValueError, FileNotFoundError, RuntimeError) as exc:
                error = exc
        plan, error = broadcast_object((plan, error))
        if error is not None:
            raise error
        return plan

    def _start_tracking(self):
        """MLflow (knowlip.track): rank 0 opens the run (reopens it on resume); local rank 0 of every node samples
        that node's system metrics into it."""
        if not self.cfg.mlflow.enabled:
            return None, None
        tracker = None
        if self.rank == 0:
            new_run = self.mlflow_run_id is None  # a resume reopens its run: the facts were logged then
            resumed = self.step if self.resumed_from is not None else None
            tracker = MlflowTracker.start(self.cfg, self.mlflow_run_id, resumed, self.resume_changes,
                                          static=self._run_facts() if new_run else None)
            if tracker is not None and new_run and isinstance(getattr(self.engine, "config", None), dict):
                tracker.log_artifact_text(json.dumps(self.engine.config, indent=1), "deepspeed_config.json")
        run_id, uri = broadcast_object((tracker.run_id, tracker.uri) if tracker else (None, None))
        system = None
        if run_id and self.cfg.mlflow.system_metrics and self.local_rank == 0:
            system = SystemMetrics(uri, run_id, self.cfg.mlflow.system_interval_s)
        return tracker, system

    def _run_facts(self) -> dict:
        """Logged once as tags: code, versions, job shape, devices, data."""
        import importlib.metadata as md
        import subprocess

        def version(name: str) -> str:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return "-"

        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "-"
        except (OSError, subprocess.TimeoutExpired):
            commit = "-"
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"git_commit": commit, "world_size": self.world_size, "global_batch": self.global_batch,
                "devices": f"{self.world_size} x {device}", "engine": self.cfg.train.engine,
                "dataset": f"{self.index.root}: {self.index.total_samples} samples in {self.index.num_shards} shards",
                **{f"version.{p}": version(p) for p in ("knowlip", "torch", "deepspeed", "mlflow")}}

    def _finish_tracking(self, status: str) -> None:
        if self.system_metrics is not None:
            self.system_metrics.stop()
        if self.tracker is not None:
            report = write_report(self.run_dir, self.run_dir / "report")
            self.tracker.finish(status, report)

    def _tokenizer(self):
        if self.cfg.model.tokenizer:
            return load_tokenizer(self.cfg.model.tokenizer)
        out = self.run_dir / "tokenizer"
        if self.rank == 0 and not (out / "tokenizer.json").is_file():
            train_wordpiece(shard_captions(self.index), out, self.cfg.train.tokenizer_vocab)
        barrier()
        return load_tokenizer(out)

    def normalise(self, batch: dict) -> torch.Tensor:
        """Raw chips -> normalised images, on the training device (never on the CPU when training on a GPU)."""
        if self.norm_params is None:
            self.norm_params = batch_params(self.cfg.norm, batch)
        return normalise_batch(batch, self.cfg.norm, self.device, self.engine.compute_dtype, self.norm_params)

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        return lr_at(step, t.lr, schedule_steps(t.warmup_steps, t.steps), t.steps)

    def alpha_at(self, step: int) -> float:
        t = self.cfg.train
        return alpha_at(step, self.cfg.model.losses.alpha, schedule_steps(t.alpha_ramp_steps, t.steps))

    def batches(self):
        """Micro-batches for ever, epoch after epoch (the loader's state says where we are)."""
        while True:
            yield from self.loader

    # -- the step --------------------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimiser step over `accumulation` micro-batches. A non-finite loss on any rank skips the step
        on every rank (counted); a stop request seen by any rank is agreed here too."""
        self.engine.set_lr(self.lr_at(self.step))
        self.engine.momentum_update()
        sums: dict[str, float] = {}
        skip = False
        phase = scio.phase_at(self.step, self.cfg)
        for batch in micro_batches:
            images = self.normalise(batch)
            ids, att, kw = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "keyword_mask"))
            screen, variants = scio.prepare(batch["captions"], self.text, phase) if phase > 1 else (None, None)
            out = self.engine.forward(images, ids, att, kw, alpha=self.alpha_at(self.step),
                                      scio=screen.to(self.device) if screen is not None else None)
            if "scio" in out:
                self._scio_record(batch, variants, out.pop("scio"), phase)
            # test hook KNOWLIP_FAULT_NAN_STEPS: the last rank sees a non-finite loss at those steps
            injected = self.rank == self.world_size - 1 and _fault_at("nan_steps", self.step + 1)
            nonfinite = not bool(torch.isfinite(out["loss"]).item()) or injected
            stop, bad = self.engine.all_reduce_max([float(self.stop.requested), float(nonfinite)])
            if stop and not self.stop.requested:
                self.stop.request()  # another rank got the signal
            if bad or skip:
                skip = True
                continue
            self.engine.backward(out["loss"])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro_batches)
        if skip:
            self.engine.skip_step()
            self.nonfinite_skipped += 1
            self.nonfinite_in_a_row += 1
            values = {"loss": float("nan"), "grad_norm": float("nan")}
        else:
            values = {**sums, "grad_norm": self.engine.step()}
            self.nonfinite_in_a_row = 0
        self.step += 1
        return values

    def _scio_record(self, batch: dict, variants: list[list[str]], out: dict, phase: int) -> None:
        self.scio_stats.add(out)
        every, step = self.cfg.scio.samples_every, self.step + 1
        if self.rank == 0 and every and step % every == 0:
            scio.write_samples(self.run_dir / "scio_samples.jsonl", step, phase, batch["keys"], batch["captions"],
                               variants, out, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                               self.cfg.scio.samples_per_write)

    def train(self, until: int | None = None) -> dict:
        """Train to train.steps, or stop earlier (train.stop_at, `until`, a signal) with a checkpoint.
        Returns {"steps", "history", "stopped", "checkpoint", ...}."""
        cfg = self.cfg
        last = min(x for x in (until, cfg.train.stop_at, cfg.train.steps) if x is not None)
        meter = _Meter(training_flops_per_sample(self.model.dims, len(self.tokenizer), cfg.model.image_size,
                                                 cfg.data.max_text_len, cfg.model.in_channels, cfg.data.batch_size,
                                                 self.model.dims.queue_size), peak_flops(self.device),
                       self.world_size)
        history: list[dict] = []
        stopped, saved = None, None
        batches = self.batches()
        with _MetricsFile(self.run_dir / "metrics.jsonl", self.rank == 0) as metrics, \
                _Progress(cfg.train.steps, self.step, self.rank == 0 and cfg.train.progress) as bar:
            while self.step < last and stopped is None:
                micro = []
                meter.fetch_started()
                for _ in range(self.accumulation):
                    micro.append(next(batches))
                    meter.fetched(micro[-1]["chips"].shape[0])
                values = self.train_step(micro)
                if _fault_at("slow_steps", self.step):
                    time.sleep(0.5)  # test hook: a window for outages (tests/test_mlflow.py)
                history.append(values)
                bar.update(values, self.global_batch)
                evals = self.evaluate_if_due()
                if evals or self.step % cfg.train.log_every == 0 or self.step in (cfg.train.steps, last):
                    row = {**self._row(values, meter.window()), **evals}
                    metrics.write(row)
                    if self.tracker is not None:
                        self.tracker.log_metrics(self.step, row)
                if self.stop.requested:
                    stopped = f"signal {self.stop.name}"
                elif self.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    stopped = "nonfinite"
                elif self.step == last and last < cfg.train.steps:
                    stopped = "stop_at"
                if stopped or self.step == cfg.train.steps or (cfg.ckpt.every and self.step % cfg.ckpt.every == 0):
                    saved = self.save_checkpoint()
        self._finish_tracking("FINISHED" if self.step >= cfg.train.steps else
                              "FAILED" if stopped == "nonfinite" else "KILLED")
        if stopped == "nonfinite":
            raise TrainingStopped(f"{self.nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite_in_a_row"
                                  f"={cfg.train.max_nonfinite_in_a_row}) at step {self.step}: stopped; the last "
                                  f"state is checkpointed in {saved}. Lower train.lr or check the data.")
        if self.step >= cfg.train.steps and self.rank == 0:
            export_checkpoint(saved or ckpt.resolve_checkpoint(self.run_dir), self.run_dir)
        barrier()
        return {"steps": self.step, "history": history, "stopped": stopped, "checkpoint": saved,
                "flops_per_sample": meter.flops_per_sample, "metrics": str(self.run_dir / "metrics.jsonl")}

    def evaluate_if_due(self) -> dict[str, float]:
        """Zero-shot evaluation on eval.shards every eval.every steps and at the end (all ranks take part)."""
        e = self.cfg.eval
        due = (e.every and self.step % e.every == 0) or self.step == self.cfg.train.steps
        if self.eval_index is None or not due:
            return {}
        result = run_eval(self.model, self.eval_index, self.text, self.cfg.norm, self.device,
                          self.engine.compute_dtype, e.batch_size, tuple(e.fields))
        return scalars(result)

    def _row(self, values: dict[str, float], throughput: dict) -> dict:
        def clean(v: float):
            return round(v, 5) if np.isfinite(v) else None

        mem = (torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        scio_fields = {"scio_phase": scio.phase_at(self.step - 1, self.cfg),
                       **self.scio_stats.take_window(self.engine.all_reduce_sum)}
        return {"step": self.step, "epoch": self.loader.epoch, "lr": self.lr_at(self.step - 1), **scio_fields,
                **{k: clean(v) for k, v in values.items()}, **throughput,
                "skipped_samples": self.loader.stats.skipped,
                **{f"skipped_{cause}": n for cause, n in self.loader.stats.skipped_by_cause.items()},
                "world_size": self.world_size,
                "global_batch": self.global_batch, "nonfinite_skipped": self.nonfinite_skipped,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "max_mem_gib": round(mem, 3), "mem_kind": "gpu_peak" if self.device.type == "cuda" else "host_rss"}

    # -- checkpoints (the layout lives in knowlip.train.checkpoint) --------------------------------------

    def client_state(self) -> dict:
        """What the engine's own files do not hold (or a universal checkpoint would drop)."""
        return {"step": self.step, "loader": self.loader.state_dict(),
                "buffers": {k: v.detach().cpu() for k, v in self.model.named_buffers()},
                "nonfinite_skipped": self.nonfinite_skipped, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "config": OmegaConf.to_container(self.cfg, resolve=True), "config_hash": config_hash(self.cfg),
                "mlflow_run_id": self.tracker.run_id if self.tracker else self.mlflow_run_id,
                "scio": {"phase": scio.phase_at(self.step, self.cfg), **self.scio_stats.state_dict()}}

    def save_checkpoint(self) -> Path:
        """Every rank writes its part into a partial folder; rank 0 publishes it once all have finished."""
        root = ckpt.checkpoint_root(self.cfg)
        partial = root / (ckpt.checkpoint_name(self.step) + ckpt.PARTIAL)
        if self.rank == 0:
            ckpt.begin_save(root, self.step)
        barrier()
        self.engine.save(partial)
        torch.save(rng_state(), ckpt.rng_file(partial, self.rank))
        if self.rank == self.world_size - 1 and _fault_at("kill_in_save", self.step):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: a rank dies with its files half written
        momentum = self.engine.momentum_state()  # a collective: every rank takes part
        if self.rank == 0:
            torch.save(momentum, partial / "momentum.pt")
            torch.save(self.client_state(), partial / "state.pt")
            self.tokenizer.save_pretrained(partial / "tokenizer")
            (partial / "config.yaml").write_text(to_yaml(self.cfg))
        barrier()
        final = root / ckpt.checkpoint_name(self.step)
        if self.rank == 0:
            meta = {"step": self.step, "world_size": self.world_size, "engine": self.cfg.train.engine,
                    "zero_stage": self.cfg.train.zero_stage if self.cfg.train.engine == "deepspeed" else None,
                    "config_hash": config_hash(self.cfg), "global_batch": self.global_batch}
            final = ckpt.commit_save(partial, meta, self.cfg.ckpt.keep)
            log.info("saved checkpoint %s", final)
            if self.tracker is not None:
                self.tracker.event("checkpoint", self.step)
        barrier()
        return final

    def load_checkpoint(self, path: Path, universal: bool = False) -> None:
        self.engine.load(path, universal)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        self.engine.load_momentum_state(torch.load(path / "momentum.pt", map_location="cpu", mmap=True))
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(state["buffers"][name])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.scio_stats.load_state_dict(state["scio"] or {})
        rng = ckpt.rng_file(path, self.rank)
        if not universal and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        else:
            seed_rank(self.cfg.seed, self.rank, self.step)
        self.mlflow_run_id = state.get("mlflow_run_id")
        if state["config_hash"] != config_hash(self.cfg) and self.rank == 0:
            changed = config_changes(state["config"], self.cfg)
            self.resume_changes = changed
            log.warning("resuming %s with a changed config: %s", path, ", ".join(changed) or "(hash only)")
        if self.rank == 0:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            print(f"knowlip: resumed from {path} at step {self.step} (epoch {self.loader.epoch}, cursor "
                  f"{self.loader.cursor}){' via its universal form' if universal else ''}", file=sys.stderr)
        self.resumed_from = path


def _fault_at(name: str, step: int) -> bool:
    """Test hooks, KNOWLIP_FAULT_<NAME>=a or a-b: inject a fault that cannot be produced from outside on cue at
    these (1-based) steps."""
    spec = os.environ.get(f"KNOWLIP_FAULT_{name.upper()}")
    if not spec:
        return False
    lo, _, hi = spec.partition("-")
    return int(lo) <= step <= int(hi or lo)


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run continues the same metrics.jsonl: rows past the checkpoint's step (logged before a crash
    and about to be redone) are dropped."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines()
    keep = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(keep) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in keep))
        tmp.replace(path)


class _MetricsFile:
    """metrics.jsonl, appended to by rank 0 only."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active, self.file = path, active, None

    def __enter__(self):
        if self.active:
            self.file = self.path.open("a")
        return self

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


class _Progress:
    """A progress bar on rank 0: step, loss, samples/s and ETA."""

    def __init__(self, total: int, initial: int, active: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not active, unit="step", file=sys.stderr,
                        mininterval=1.0, dynamic_ncols=True, desc="train")
        self.last = time.perf_counter()

    def update(self, values: dict, samples: int) -> None:
        now = time.perf_counter()
        rate, self.last = samples / max(now - self.last, 1e-9), now
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", samples_per_s=f"{rate:.1f}", refresh=False)
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

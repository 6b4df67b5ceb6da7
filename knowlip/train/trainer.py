"""The trainer: one readable orchestrator over the engine, the loader and the checkpoints.

One step: raw chips to the device -> fused SAR normalisation -> momentum update -> forward (ITC, ITM,
reconstruction) -> every rank agrees on (stop requested?, loss non-finite?) -> backward -> engine step.
After the step: metrics (rank 0, <run_dir>/metrics.jsonl), then a checkpoint when one is due (`ckpt.every`,
`train.stop_at`, the end, a signal, too many non-finite steps in a row).
"""

from __future__ import annotations

import errno
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from knowlip.config import config_changes, config_hash, global_batch, replaced, schedule_steps, to_yaml
from knowlip.data.loader import build_loader, shard_captions
from knowlip.data.shards import ShardIndex, load_index
from knowlip.data.storage import storage_options
from knowlip.distributed import all_reduce_floats, barrier, init_process_group
from knowlip.eval.zero_shot import run_eval, scalars
from knowlip.launch.local import RankEnv, free_port, resolve_device
from knowlip.launch.run_lock import lock_run
from knowlip.launch.signals import StopRequest
from knowlip.model.build import build_model
from knowlip.model.flops import peak_flops, training_flops_per_sample
from knowlip.ops.sar_norm import normalise_batch
from knowlip.text.tokenizer import CaptionTokenizer, run_tokenizer
from knowlip.track.report import RESUMED
from knowlip.train.memory_model import zero3_gather_for, zero_stage_for
from knowlip.train.registry import register_finished_model
from knowlip.track.run_tracking import RunTracking, end_status, run_facts
from knowlip.train import scio_loop
from knowlip.train.checkpoint import (CONFIG, STATE, TOKENIZER, CheckpointManager, ModelBuffers, plan_resume,
                                      resolve_checkpoint)
from knowlip.train.engine import build_engine, check_deepspeed_section
from knowlip.train.export import export_checkpoint
from knowlip.train.faults import fault_at, kill_self, poison_gradients
from knowlip.train.metrics import (METRICS_FILE, SCIO_SAMPLES_FILE, MetricsFile, ProgressBar, Throughput,
                                   history_files, memory_use, step_line, truncate_metrics)
from knowlip.train.schedule import alpha_at, lr_at

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved first."""


def check_data_fits(cfg, index: ShardIndex, world_size: int) -> None:
    """Fail before building anything when the shards cannot feed this model and batch."""
    channels = {len(b.split("+")) for b in index.info.get("report", {}).get("bands", {})}
    if channels and channels != {cfg.model.in_channels}:
        raise ValueError(f"{index.root}: chips have {sorted(channels)} channel(s) but model.in_channels="
                         f"{cfg.model.in_channels}")
    if index.total_samples < cfg.data.batch_size * world_size:
        raise ValueError(f"{index.root}: {index.total_samples} samples are fewer than one batch "
                         f"(data.batch_size={cfg.data.batch_size} x {world_size} rank(s))")


class Trainer:
    def __init__(self, cfg, ranks: RankEnv | None = None, stop: StopRequest | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        ranks = ranks or RankEnv(0, 1, 0, 1, "127.0.0.1", free_port())
        if cfg.train.engine == "plain" and ranks.world_size > 1:
            raise ValueError("train.engine=plain runs one process; use train.engine=deepspeed for several ranks")
        if ranks.rank == 0:
            lock_run(cfg)  # one job per run folder: a second one stops here, before it writes anything
        # Everything that can fail on the config or the data fails here, before any process group exists.
        self.global_batch, self.accumulation = global_batch(cfg, ranks.world_size)
        check_deepspeed_section(OmegaConf.to_container(cfg.deepspeed, resolve=True), cfg.train.zero_stage)
        storage = storage_options(cfg.storage)
        self.index = load_index(cfg.data.shards, storage)  # read once per rank; a bad path or URL fails now
        check_data_fits(cfg, self.index, ranks.world_size)
        self.eval_index = load_index(cfg.eval.shards, storage) if cfg.eval.shards else None
        self.device = resolve_device(cfg.train.device, ranks.local_rank)
        if self.device.type == "cpu" and ranks.local_world_size > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // ranks.local_world_size))
        if cfg.train.engine == "deepspeed":
            init_process_group(ranks, self.device, cfg.dist.backend, cfg.dist.timeout_s)
        self.rank, self.world_size, self.local_rank = ranks.rank, ranks.world_size, ranks.local_rank
        self.stop = stop or StopRequest()
        bf16 = cfg.train.precision in ("bf16", "bf16_weights") or (cfg.train.precision == "auto" and
                                                                    self.device.type == "cuda")

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.run_dir / CONFIG).write_text(to_yaml(cfg))  # the resolved config, at once (secrets masked)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.tokenizer = run_tokenizer(cfg.model.tokenizer, self.run_dir / TOKENIZER, lambda: shard_captions(self.index),
                                       cfg.train.tokenizer_vocab, self.rank == 0, barrier)
        self.text = CaptionTokenizer(self.tokenizer, cfg.data.max_text_len, cfg.model.losses.mask_geo_clause)
        self.loader = build_loader(cfg.data, self.rank, self.world_size, tokenizer=self.text,
                                   pin_memory=self.device.type == "cuda", index=self.index)
        model = build_model(cfg.model, self.tokenizer)
        self.zero_choice, self.gather_reason = None, None
        if cfg.train.engine == "deepspeed":  # train.zero_stage=auto becomes a stage here, for this whole job
            self.zero_choice = zero_stage_for(cfg, model, self.device, ranks.world_size)
            self.cfg = cfg = replaced(cfg, "train.zero_stage", self.zero_choice.stage)
            if cfg.train.zero_stage == 3:
                gather, self.gather_reason = ((self.zero_choice.gather, "a block at a time does not fit")
                                              if self.zero_choice.gather else zero3_gather_for(cfg, self.accumulation))
                self.cfg = cfg = replaced(cfg, "train.zero3_gather", gather)
            if not self.zero_choice.fits and ranks.rank == 0:
                log.warning("train.zero_stage=auto: %s", self.zero_choice.reason)
        model.vision.activation_checkpointing = model.text.activation_checkpointing = cfg.train.activation_checkpointing
        if cfg.train.compile:
            for block in [*model.vision.blocks, *model.text.layers]:
                block.compile()
        plan = plan_resume(cfg, self.rank, self.world_size, history_files(self.run_dir))
        self.engine = build_engine(model, cfg, self.device, bf16, self.accumulation, plan.universal)
        self.model = self.engine.module
        notes = {"zero_stage_reason": self.zero_choice.reason} if self.zero_choice else {}
        self.checkpoints = CheckpointManager(cfg, self.engine, self.tokenizer, self.rank, self.world_size,
                                             self.global_batch, notes)
        self.step, self.nonfinite_skipped, self.nonfinite_in_a_row = 0, 0, 0
        self.scio_stats = scio_loop.ScioStats()
        self.mlflow_run_id: str | None = None
        for name, component in (("trainer", self), ("loader", self.loader), ("buffers", ModelBuffers(self.model)),
                                ("scio", self.scio_stats)):
            self.checkpoints.register(name, component)
        self.checkpoints.rng.reseed()
        self.resumed_from, self.resume_changes = None, []
        if plan.path is not None:
            self.resume(plan.path, plan.universal, plan.abandoned)
        elif self.rank == 0:
            truncate_metrics(self.metrics_path, 0)  # rows of an attempt that never saved a checkpoint
        self.tracking = RunTracking(None, None)  # started by train()
        if self.rank == 0:
            for line in self.start_summary():
                log.info("%s", line)

    def start_summary(self) -> list[str]:
        """What an operator wants at the top of a job's log."""
        cfg, engine = self.cfg, self.cfg.train.engine
        parts: dict[str, int] = {}
        for name, p in self.model.named_parameters():
            part = name.split(".")[0]
            part = "momentum copies" if part.endswith("_m") else part
            parts[part] = parts.get(part, 0) + int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3: the whole size
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        stage = f" ZeRO-{cfg.train.zero_stage} ({self.zero_choice.reason})" if self.zero_choice else ""
        if self.gather_reason:
            stage += f", train.zero3_gather={cfg.train.zero3_gather} ({self.gather_reason})"
        start = (f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "a fresh start")
        return [f"run {self.run_dir} (its resolved config: {self.run_dir / CONFIG})",
                f"model {cfg.model.size}: {sum(parts.values()):,} parameters ("
                + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + ")",
                f"{self.world_size} rank(s) on {device}, engine {engine}{stage}, {self.engine.compute_dtype}; global "
                f"batch {self.global_batch} ({cfg.data.batch_size} x {self.world_size} rank(s) x "
                f"{self.accumulation} micro-batch(es))",
                f"data {self.index.root}: {self.index.total_samples:,} samples in {self.index.num_shards} shards, "
                f"fingerprint {self.index.fingerprint()}",
                f"steps {self.step} -> {cfg.train.steps}: {start}"]

    def start_tracking(self) -> None:
        """Open the MLflow run (or reopen the resumed one); every rank calls this (a broadcast)."""
        if self.tracking.started:
            return
        self.tracking = RunTracking.start(self.cfg, self.rank, self.local_rank, self.mlflow_run_id,
                                          self.step if self.resumed_from else None, self.resume_changes,
                                          self._run_facts, getattr(self.engine, "config", None))

    def _run_facts(self) -> dict:
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        dataset = f"{self.index.root}: {self.index.total_samples} samples in {self.index.num_shards} shards"
        facts = run_facts(self.world_size, self.global_batch, device, self.cfg.train.engine, dataset)
        if self.zero_choice:  # train.zero_stage (a param) is the stage taken; the tag says why
            facts["zero_stage_reason"] = self.zero_choice.reason
        return facts

    # -- checkpointed state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_skipped": self.nonfinite_skipped,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "mlflow_run_id": self.tracking.run_id or self.mlflow_run_id}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.nonfinite_skipped, self.nonfinite_in_a_row = int(state["nonfinite_skipped"]), int(state["nonfinite_in_a_row"])
        self.mlflow_run_id = state.get("mlflow_run_id")

    def resume(self, path: Path, universal: bool = False, abandoned: Path | None = None) -> None:
        saved_config = self.checkpoints.load(path, universal)
        if self.rank == 0:
            if saved_config and config_hash(saved_config) != config_hash(self.cfg):
                self.resume_changes = config_changes(saved_config, self.cfg)
                log.warning("resuming %s with a changed config: %s", path, ", ".join(self.resume_changes) or "(hash only)")
            truncate_metrics(self.metrics_path, self.step, keep_dropped_in=abandoned)
            log.info("resumed from %s at step %d (epoch %d, cursor %d)%s", path, self.step, self.loader.epoch,
                     self.loader.cursor, " via its universal form" if universal else "")
        self.resumed_from = path

    def save_checkpoint(self) -> Path:
        def fault(_partial: Path) -> None:  # test hooks
            if self.rank == self.world_size - 1 and fault_at("kill_in_save", self.step):
                kill_self()  # a rank dies with its files half written
            if self.rank == 0 and fault_at("enospc_in_save", self.step):
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(_partial / STATE))

        saved = self.checkpoints.save(self.step, fault)
        self.tracking.event("checkpoint", self.step)
        return saved

    # -- the step --------------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        return lr_at(step, t.lr, schedule_steps(t.warmup_steps, t.steps), t.steps, t.min_lr)

    def alpha_at(self, step: int) -> float:
        t = self.cfg.train
        return alpha_at(step, self.cfg.model.losses.alpha, schedule_steps(t.alpha_ramp_steps, t.steps))

    def batches(self):
        """Micro-batches for ever, epoch after epoch (the loader's state says where we are)."""
        while True:
            yield from self.loader

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimiser step over `accumulation` micro-batches. A non-finite loss on any rank, or non-finite
        gradients, skip the step on every rank (counted); a stop request seen by any rank is agreed here too."""
        self.engine.set_lr(self.lr_at(self.step))
        self.engine.momentum_update()
        sums: dict[str, float] = {}
        skip = False
        phase = scio_loop.phase_at(self.step, self.cfg)
        for batch in micro_batches:
            images = normalise_batch(batch, self.cfg.norm, self.device, self.engine.compute_dtype)
            ids, att, kw = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "keyword_mask"))
            screen, variants = scio_loop.prepare(batch["captions"], self.text, phase) if phase > 1 else (None, None)
            out = self.engine.forward(images, ids, att, kw, alpha=self.alpha_at(self.step),
                                      scio=screen.to(self.device) if screen is not None else None)
            if "scio" in out:
                self._scio_record(batch, screen, variants, out.pop("scio"), phase)
            injected = self.rank == self.world_size - 1 and fault_at("nan_steps", self.step + 1)
            nonfinite = not bool(torch.isfinite(out["loss"]).item()) or injected
            stop, bad = all_reduce_floats([float(self.stop.requested), float(nonfinite)], "max", self.device)
            if stop and not self.stop.requested:
                self.stop.request()  # another rank got the signal
            if bad or skip:
                skip = True
                continue
            loss = out["loss"]
            if self.rank == self.world_size - 1 and fault_at("nan_grads", self.step + 1):
                loss = poison_gradients(loss)  # test hook: finite loss, NaN gradients
            self.engine.backward(loss)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro_batches)
        if skip:
            self.engine.skip_step()
            values = {"loss": float("nan"), "grad_norm": float("nan")}
        else:  # an engine does not apply gradients whose global norm is not finite (the same on every rank)
            values = {**sums, "grad_norm": self.engine.step()}
        if skip or not math.isfinite(values["grad_norm"]):
            self.nonfinite_skipped += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0
        self.step += 1
        return values

    def _scio_record(self, batch: dict, screen, variants: list[list[str]], out: dict, phase: int) -> None:
        self.scio_stats.add(out, scio_loop.score(out, batch, screen, self.text))
        every, step = self.cfg.scio.samples_every, self.step + 1
        if self.rank == 0 and every and step % every == 0:
            scio_loop.write_samples(self.run_dir / SCIO_SAMPLES_FILE, step, phase, batch["keys"], batch["captions"],
                                    variants, out, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                                    self.cfg.scio.samples_per_write)

    def train(self, until: int | None = None) -> dict:
        """Train to train.steps, or stop earlier (train.stop_at, `until`, a signal) with a checkpoint.
        Returns {"steps", "history", "stopped", "checkpoint", ...}."""
        cfg = self.cfg
        last = min(x for x in (until, cfg.train.stop_at, cfg.train.steps) if x is not None)
        meter = Throughput(training_flops_per_sample(self.model.dims, len(self.tokenizer), cfg.model.image_size,
                                                     cfg.data.max_text_len, cfg.model.in_channels, cfg.data.batch_size,
                                                     self.model.dims.queue_size), peak_flops(self.device),
                           self.world_size)
        history: list[dict] = []
        self.start_tracking()  # here, not at construction: a start with nothing to train never reopens the run
        try:
            stopped, saved = self._loop(last, meter, history)
        except BaseException as exc:
            self.tracking.finish("FAILED", self.run_dir, f"{type(exc).__name__} at step {self.step}: {exc}"[:500])
            raise
        status, why = end_status(stopped, self.step, cfg.train.steps)
        self.tracking.finish(status, self.run_dir, why)
        if stopped == "nonfinite":
            raise TrainingStopped(f"{self.nonfinite_in_a_row} non-finite losses or gradients in a row "
                                  f"(train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row}) at step "
                                  f"{self.step}: stopped; the last state is checkpointed in {saved}. Lower "
                                  "train.lr or check the data.")
        if self.step >= cfg.train.steps and self.rank == 0:
            # the checkpoint this job just saved is not hashed a second time
            export_checkpoint(saved or resolve_checkpoint(self.run_dir), self.run_dir, verify=saved is None)
        barrier()
        if self.step >= cfg.train.steps and self.rank == 0 and cfg.mlflow.enabled and cfg.mlflow.register_as:
            # after the barrier: the other ranks need not wait (a large model's upload can outlast dist.timeout_s)
            register_finished_model(self.run_dir, cfg.mlflow.register_as, self.tracking.uri)
        return {"steps": self.step, "history": history, "stopped": stopped, "checkpoint": saved,
                "flops_per_sample": meter.flops_per_sample, "metrics": str(self.metrics_path)}

    def _loop(self, last: int, meter: Throughput, history: list[dict]) -> tuple[str | None, Path | None]:
        """Steps until `last` or a stop; returns (why it stopped early or None, the last checkpoint saved)."""
        cfg = self.cfg
        stopped, saved, history_logged = None, None, False
        batches = self.batches()
        with MetricsFile(self.metrics_path, self.rank == 0) as metrics, \
                ProgressBar(cfg.train.steps, self.step, self.rank == 0 and cfg.train.progress) as bar:
            while self.step < last and stopped is None:
                micro = []
                meter.fetch_started()
                for _ in range(self.accumulation):
                    micro.append(next(batches))
                    meter.fetched(micro[-1]["chips"].shape[0])
                values = self.train_step(micro)
                if fault_at("slow_steps", self.step):
                    time.sleep(0.5)
                history.append(values)
                bar.update(values, self.global_batch)
                evals = self.evaluate_if_due()
                if self.stop.requested:
                    stopped = f"signal {self.stop.name}"
                elif self.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    stopped = "nonfinite"
                elif self.step == last and last < cfg.train.steps:
                    stopped = "stop_at"
                if evals or stopped or self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    row = {**self._row(values, meter.window()), **evals}
                    if self.resumed_from is not None and not history_logged:
                        row[RESUMED] = self.step - len(history)  # the report marks where the run resumed
                    history_logged = True
                    metrics.write(row)
                    self.tracking.log_metrics(self.step, row)
                    if self.rank == 0 and not bar.active:
                        log.info("%s", step_line(row, cfg.train.steps, self.global_batch))
                if self.checkpoints.due(self.step, forced=stopped is not None):
                    saved = self.save_checkpoint()
        return stopped, saved

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
        """One row of metrics.jsonl (and of MLflow's metrics)."""
        def clean(v: float):
            return round(v, 5) if np.isfinite(v) else None

        scio_fields = {"scio_phase": scio_loop.phase_at(self.step - 1, self.cfg),
                       **self.scio_stats.take_window(lambda v: all_reduce_floats(v, "sum", self.device))}
        return {"step": self.step, "epoch": self.loader.epoch, "lr": self.lr_at(self.step - 1), **scio_fields,
                **{k: clean(v) for k, v in values.items()}, **throughput,
                "skipped_samples": self.loader.stats.skipped,
                **{f"skipped_{cause}": n for cause, n in self.loader.stats.skipped_by_cause.items()},
                "world_size": self.world_size,
                "global_batch": self.global_batch, "nonfinite_skipped": self.nonfinite_skipped,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, **memory_use(self.device)}

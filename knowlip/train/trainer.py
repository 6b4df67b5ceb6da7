"""The training loop, plain PyTorch in one process (the DeepSpeed ZeRO-3 engine replaces the optimiser step
in a later release; the step below is written so that it can).

One step: raw chips to the device -> fused SAR normalisation -> momentum update -> model forward (ITC, ITM,
reconstruction) -> backward -> optimiser step. Metrics go to <run_dir>/metrics.jsonl; the final weights,
tokenizer and resolved config to <run_dir>.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from knowlip.data.loader import StreamingLoader, build_loader
from knowlip.data.shards import ShardIndex, load_index
from knowlip.model.build import build_model
from knowlip.model.flops import training_flops_per_sample
from knowlip.ops.sar_norm import params_from_config, sar_normalize
from knowlip.text.tokenizer import CaptionTokenizer, load_tokenizer, train_wordpiece

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device name, for MFU (anchors.md); unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


def check_data_fits(cfg, index: ShardIndex) -> None:
    """Fail before building anything when the shards cannot feed this model and batch."""
    channels = {len(b.split("+")) for b in index.info.get("report", {}).get("bands", {})}
    if channels and channels != {cfg.model.in_channels}:
        raise ValueError(f"{index.root}: chips have {sorted(channels)} channel(s) but model.in_channels="
                         f"{cfg.model.in_channels}")
    if index.total_samples < cfg.data.batch_size:
        raise ValueError(f"{index.root}: {index.total_samples} samples are fewer than one batch "
                         f"(data.batch_size={cfg.data.batch_size})")


class _Meter:
    """Throughput over the window since the last log line: samples/s, TFLOP/s, MFU, data-wait share."""

    def __init__(self, flops_per_sample: int, peak: float | None):
        self.flops_per_sample, self.peak = flops_per_sample, peak
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.data_time, self._fetch = time.perf_counter(), 0, 0.0, time.perf_counter()

    def fetch_started(self) -> None:
        self._fetch = time.perf_counter()

    def fetched(self, samples: int) -> None:
        self.data_time += time.perf_counter() - self._fetch
        self.samples += samples

    def window(self) -> dict:
        elapsed = time.perf_counter() - self.start
        flops = self.flops_per_sample * self.samples / elapsed
        out = {"samples_per_s": round(self.samples / elapsed, 2), "tflops_per_s": round(flops / 1e12, 4),
               "mfu": round(flops / self.peak, 4) if self.peak else None,
               "data_time_share": round(self.data_time / elapsed, 3)}
        self._reset()
        return out


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device)
        self.index = load_index(cfg.data.shards)  # read once: index.json holds every sample's offset
        check_data_fits(cfg, self.index)
        torch.manual_seed(cfg.seed)
        self.tokenizer = self._tokenizer()
        self.text = CaptionTokenizer(self.tokenizer, cfg.data.max_text_len)
        self.loader = build_loader(cfg.data, tokenizer=self.text, pin_memory=self.device.type == "cuda",
                                   index=self.index)
        self.model = build_model(cfg.model, self.tokenizer).to(self.device)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.train.lr, betas=(0.9, 0.98))
        self.step = 0
        self.norm_params = None
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else None

    # -- building blocks -------------------------------------------------------------------------------------

    def _tokenizer(self):
        if self.cfg.model.tokenizer:
            return load_tokenizer(self.cfg.model.tokenizer)
        out = self.run_dir / "tokenizer"
        if not (out / "tokenizer.json").is_file():
            train_wordpiece(shard_captions(self.index), out, self.cfg.train.tokenizer_vocab)
        return load_tokenizer(out)

    def _param_groups(self) -> list[dict]:
        """No weight decay on biases, norms, embeddings tables of positions/tokens and the temperature."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            flat = p.dim() < 2 or name.endswith(("pos_embed", "cls_token", "temp"))
            (no_decay if flat else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def alpha_at(self, step: int) -> float:
        ramp = self.cfg.train.alpha_ramp_steps
        return self.cfg.model.losses.alpha * min(1.0, (step + 1) / ramp) if ramp > 0 else self.cfg.model.losses.alpha

    def normalise(self, batch: dict) -> torch.Tensor:
        """Raw chips -> normalised images, on the training device (never on the CPU when training on a GPU)."""
        chips = batch["chips"].to(self.device, non_blocking=True)
        if self.norm_params is None:
            meta = batch["meta"][0]
            self.norm_params = params_from_config(self.cfg.norm, meta["polarisations"], meta["product"],
                                                  meta.get("calibration_gain"))
        images, _ = sar_normalize(chips, self.norm_params)
        return images if self.autocast is not None else images.float()

    # -- the step --------------------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict[str, float]:
        images = self.normalise(batch)
        ids, att, kw = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "keyword_mask"))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.model.momentum_update()
        with self.autocast if self.autocast is not None else contextlib.nullcontext():
            out = self.model(images, ids, att, kw, alpha=self.alpha_at(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.step += 1
        return {**{k: float(v.detach()) for k, v in out.items()}, "grad_norm": float(grad_norm)}

    def train(self, until: int | None = None) -> dict:
        """Train to `until` steps (default train.steps; an earlier stop is what a preemption looks like)."""
        cfg = self.cfg
        last = cfg.train.steps if until is None else min(until, cfg.train.steps)
        meter = _Meter(training_flops_per_sample(self.model.dims, len(self.tokenizer), cfg.model.image_size,
                                                 cfg.data.max_text_len, cfg.model.in_channels, cfg.data.batch_size,
                                                 self.model.dims.queue_size), peak_flops(self.device))
        metrics_path = self.run_dir / "metrics.jsonl"
        history: list[dict] = []
        with metrics_path.open("a") as metrics:
            while self.step < last:
                meter.fetch_started()
                for batch in self.loader:
                    meter.fetched(batch["chips"].shape[0])
                    values = self.train_step(batch)
                    history.append(values)
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        self._log(metrics, values, meter.window())
                    if self.step >= last:
                        break
                    meter.fetch_started()
        if self.step >= cfg.train.steps:
            self.save_final()
        return {"steps": self.step, "history": history, "flops_per_sample": meter.flops_per_sample,
                "metrics": str(metrics_path)}

    def _log(self, metrics, values: dict[str, float], throughput: dict) -> None:
        row = {"step": self.step, "epoch": self.loader.epoch, "lr": self.lr_at(self.step - 1),
               **{k: round(v, 5) for k, v in values.items()}, **throughput,
               "skipped_samples": self.loader.stats.skipped,
               "max_mem_gib": (round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
                               if self.device.type == "cuda" else None)}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        log.info("step %d loss %.4f (itc %.3f itm %.3f recon %.3f) %.1f samples/s", self.step, values["loss"],
                 values["loss_itc"], values["loss_itm"], values["loss_recon"], row["samples_per_s"])

    # -- resumable state (the checkpoint layer collects this) ----------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    def save_final(self) -> Path:
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        path = self.run_dir / "model.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(weights, str(tmp))
        tmp.replace(path)
        self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        return path

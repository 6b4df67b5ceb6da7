"""The training engine: DeepSpeed ZeRO across ranks (`ZeroEngine`; stage 3 by default, 1 or 2 by
train.zero_stage), or plain torch in one process
(`PlainEngine`, for debugging and as the baseline of bench/train_step.py). Both expose the same small API:

    forward(...) / backward(loss) / step() -> grad norm / skip_step() / set_lr(lr) / momentum_update()
    save(folder, tag) / load(folder, tag) / momentum_state() / load_momentum_state(state)

The traps of ZeRO-3 this module handles (../shared/notes/zero3-patterns.md):
- DeepSpeed clips gradients at 1.0 unless told otherwise: `gradient_clipping` is always set, from train.grad_clip.
- The momentum (EMA) copies are frozen, partitioned parameters: the update writes the partitions (and the full
  copy of persistent small parameters), outside forward, from an fp32 accumulator so that a bf16 run's EMA is
  not rounded away (0.005 x a weight difference is below bf16's resolution).
- Universal checkpoints keep only trainable parameters: the momentum weights and buffers travel in our own files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from knowlip.config import ConfigError, global_batch
from knowlip.distributed import get_rank, get_world_size
from knowlip.model.sar_knowlip import ema_update
from knowlip.train.checkpoint import ENGINE_TAG, load_data, plain_engine_file
from knowlip.train.memory_model import fresh_zero3_gather
from knowlip.train.param_layout import FLAT_LAYOUT, PER_PARAMETER, FlatLayout

log = logging.getLogger(__name__)

OPTIMIZER_BETAS = (0.9, 0.98)  # why not BLIP's (0.9, 0.999): the comment on train.weight_decay in config.py
# DeepSpeed keys that knowlip derives from its own config; the `deepspeed:` section may not set them.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position/class embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.dim() < 2 or name.endswith(("pos_embed", "cls_token", "temp"))
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_deepspeed_section(section: dict, zero_stage: int) -> None:
    """The `deepspeed:` pass-through may add to what knowlip sets, not contradict it (checked before launch)."""
    for key in OWNED_KEYS:
        if key in section:
            raise ConfigError(f"deepspeed.{key} is set by knowlip (data.batch_size, train.global_batch_size, "
                              "train.grad_clip, train.lr): remove it from the deepspeed section")
    stage = section.get("zero_optimization", {}).get("stage", zero_stage)
    if stage != zero_stage:
        raise ConfigError(f"deepspeed.zero_optimization.stage={stage} contradicts train.zero_stage={zero_stage}: "
                          "choose the stage with train.zero_stage")


def deepspeed_config(cfg, world_size: int, accumulation: int, bf16: bool, universal: bool) -> dict:
    """DeepSpeed's config: what knowlip models, then the user's `deepspeed:` section merged over it."""
    from omegaconf import OmegaConf

    user = OmegaConf.to_container(cfg.deepspeed, resolve=True) if len(cfg.deepspeed) else {}
    stage = cfg.train.zero_stage
    check_deepspeed_section(user, stage)
    if stage == "auto":
        raise ValueError("train.zero_stage=auto reaches the engine unresolved: resolve it first "
                         "(knowlip.train.memory_model.zero_stage_for, as the Trainer does)")
    ours = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": global_batch(cfg, world_size)[0],
        "gradient_clipping": float(cfg.train.grad_clip),  # explicit: DeepSpeed's default is 1.0, not off
        # Overlap the gradient reduction with backward: DeepSpeed's default at stage 3, not below it.
        "zero_optimization": {"stage": stage, "overlap_comm": True,
                              # DeepSpeed's memory-efficient linear keeps no gathered weight alive for backward;
                              # a block at a time, for speed, takes torch's (no wrapper around every call: 10% of
                              # that step's Python calls; memory_model counts the weights it keeps)
                              **({"memory_efficient_linear": False} if block_gather(cfg, stage, accumulation) else {})},
        "bf16": {"enabled": bf16, "check_grad_overflow": True},  # stages 1-2 skip non-finite steps only so
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "checkpoint": {"load_universal": universal},
    }
    return deep_merge(ours, user)


class PlainEngine:
    """One process, torch AdamW: the reference the ZeRO-3 engine is compared with. Precision: float32; bf16
    autocast (float32 weights, bf16 matmuls); or bf16 weights (`bf16_weights`: the model's weights and
    activations in bf16 as ZeRO-3's bf16 mode keeps them, float32 master weights in the optimiser and float32
    momentum (EMA) accumulators; on an H100, `base` at batch 128: 0.315 s a step against autocast's 0.387 s,
    BENCHMARKS.md)."""

    name = "plain"

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, bf16: bool, accumulation: int = 1,
                 bf16_weights: bool = False):
        self.module, self.device, self.cfg = model.to(device), device, cfg
        self.accumulation = accumulation
        self.compute_dtype = torch.bfloat16 if bf16 or bf16_weights else torch.float32
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not bf16_weights else None
        self.masters: dict[torch.nn.Parameter, torch.Tensor] = {}  # bf16 weight -> its float32 master
        self.momentum = ReplicatedMomentum(model, fp32_accumulators=bf16_weights)  # before the cast: exact
        groups = param_groups(model, cfg.train.weight_decay)
        if bf16_weights:
            self.masters = {p: p.detach().float().clone() for g in groups for p in g["params"]}
            model.to(torch.bfloat16)
            groups = [{**g, "params": [self.masters[p] for p in g["params"]]} for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=OPTIMIZER_BETAS)

    def forward(self, *args, **kwargs) -> dict:
        if self.autocast is None:
            return self.module(*args, **kwargs)
        with self.autocast:
            return self.module(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def momentum_update(self) -> None:
        self.momentum.update(self.masters)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    @torch.no_grad()
    def step(self) -> float:
        """Clip (train.grad_clip; 0 = off), apply, clear. Returns the global gradient norm before clipping; a
        non-finite one means the step was not applied."""
        for p, master in self.masters.items():  # bf16 gradients -> the float32 masters the optimiser owns
            master.grad = p.grad.float() if p.grad is not None else None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if not torch.isfinite(norm):  # skipped, as DeepSpeed's ZeRO optimisers skip it
            self.skip_step()
            return float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters:  # the model clamps its bf16 temperature in forward; its master is clamped here (as ZeRO-3)
            loss_cfg = self.module.loss_cfg
            self.masters[self.module.temp].clamp_(loss_cfg.temp_min, loss_cfg.temp_max)
        self._sync_from_masters()
        return float(norm)

    def _sync_from_masters(self) -> None:
        if self.masters:
            for p, master in self.masters.items():
                p.grad = None
                p.copy_(master)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.masters:
            p.grad = None

    def save(self, folder: Path, tag: str = ENGINE_TAG) -> None:
        path = plain_engine_file(folder, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.masters:  # the float32 truth behind the bf16 weights
            names = {p: n for n, p in self.module.named_parameters()}
            state["masters"] = {names[p]: m for p, m in self.masters.items()}
            state["ema32"] = {names[p]: a for p, a in self.momentum.ema32.items()}
        torch.save(state, path)

    @torch.no_grad()
    def load(self, folder: Path, tag: str = ENGINE_TAG) -> None:
        path = plain_engine_file(folder, tag)
        state = load_data(path, map_location=self.device)
        if self.masters and "masters" not in state:
            raise ValueError(f"{path}: written without bf16 weights (train.precision); resume it "
                             "with the precision it was trained with")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.masters:
            params = dict(self.module.named_parameters())
            for name, value in state["masters"].items():
                self.masters[params[name]].copy_(value)
            for name, value in state["ema32"].items():
                self.momentum.ema32[params[name]].copy_(value)
            self._sync_from_masters()

    def momentum_state(self) -> dict[str, torch.Tensor]:
        return self.momentum.state()

    def load_momentum_state(self, state: dict[str, torch.Tensor]) -> None:
        self.momentum.load_state(state)


class ReplicatedMomentum:
    """The momentum (EMA) weights where this process holds them whole: the plain engine, and every rank under
    ZeRO-1/2 (ZeRO-3 holds partitions: ZeroEngine updates those itself). With bf16 weights the update runs in
    float32 accumulators (`ema32`; 0.005 x a step is below bf16's resolution) and is rounded into the weights."""

    def __init__(self, model: torch.nn.Module, fp32_accumulators: bool):
        self.model, self.pairs = model, list(model.momentum_pairs())
        self.named = _momentum_named(model)
        self.ema32 = {ema_param: ema_param.detach().float().clone() for _, ema_param in self.pairs} if fp32_accumulators else {}

    @torch.no_grad()
    def update(self, masters: dict[torch.nn.Parameter, torch.Tensor] | None = None) -> None:
        """`masters`: the online weights' float32 masters where the optimiser keeps them apart (the plain
        engine's bf16 weights); otherwise the update reads the online weights themselves."""
        online = [masters[p] if masters else p.detach().float() for p, _ in self.pairs]
        moving = [ema_param for _, ema_param in self.pairs]
        ema_update(moving, online, self.model.loss_cfg.momentum,
                   [self.ema32[ema_param] for ema_param in moving] if self.ema32 else None)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: self.ema32.get(ema_param, ema_param).detach().float().cpu().clone() for name, ema_param in self.named}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, ema_param in self.named:
            ema_param.copy_(state[name])
            if self.ema32:
                self.ema32[ema_param].copy_(state[name])


def _momentum_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The frozen momentum copies, by their name in the model."""
    ids = {id(ema_param) for _, ema_param in model.momentum_pairs()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


class ZeroEngine:
    """DeepSpeed ZeRO over the initialised process group, at stage train.zero_stage. Stage 3 partitions the
    weights (each rank holds a slice; DeepSpeed gathers a module's weights around every call of it); stages 1
    and 2 keep the weights whole on every rank and partition the optimiser state (2: the gradients too), so a
    module call costs no gather and no hook (an H100 spent most of a ZeRO-3 step of `base` in that host work,
    BENCHMARKS.md)."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, bf16: bool, accumulation: int,
                 universal: bool = False):
        import deepspeed

        self.device, self.cfg, self.accumulation = device, cfg, accumulation
        self.stage = cfg.train.zero_stage
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.layout = flat_layout(cfg, self.stage, accumulation, model)
        if self.layout:
            self.layout.apply(model)  # before the optimiser's groups are made: they hold the flat parameters
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                      betas=OPTIMIZER_BETAS)
        self.config = deepspeed_config(cfg, get_world_size(), accumulation, bf16, universal)
        self.block_gather = block_gather(cfg, self.stage, accumulation)
        if self.stage == 3:
            set_gather_units(model, self.block_gather)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.config, dist_init_required=False)
        self.module = self.engine.module
        if self.layout:
            self.layout.bind_before_each_call(self.module)  # after DeepSpeed's gathering hooks
        self._micro = 0
        # Below stage 3 every rank holds the momentum weights whole, as the plain engine does.
        self.replicated = ReplicatedMomentum(self.module, fp32_accumulators=bf16) if self.stage < 3 else None
        if self.replicated is None:
            self._build_ema_state()

    @property
    def param_layout(self) -> str:
        """How DeepSpeed's files hold the weights (meta.json records it; a resume keeps it)."""
        return FLAT_LAYOUT if self.layout else PER_PARAMETER

    # -- the step ----------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs) -> dict:
        return self.engine(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        self.engine.set_gradient_accumulation_boundary(self._micro == self.accumulation)
        if self.block_gather:
            # A block runs several times a step (the text model: five passes) and DeepSpeed reduces a leaf
            # module's gradients from its backward hook, once per call: one reduction pass after the whole
            # backward instead (else a parameter lands twice in one bucket, or partial gradients are reduced).
            with self.engine.coalesce_grad_reduction():
                self.engine.backward(loss)
        else:
            self.engine.backward(loss)
        if self._micro < self.accumulation:
            self.engine.step()  # accumulates only: the boundary is not reached

    def step(self) -> float:
        """The optimiser step at the accumulation boundary (DeepSpeed clips by train.grad_clip). Returns the
        global gradient norm before clipping: inf when DeepSpeed found it non-finite and did not apply the step
        (every ZeRO stage checks; in bf16 because `check_grad_overflow` is set)."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self._micro = 0
        self._clamp_temperature_master()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _clamp_temperature_master(self) -> None:
        """The model clamps its temperature in place in forward, as BLIP does; under ZeRO that reaches only the
        working copy, so the optimiser's fp32 master is clamped here too (else it would drift past the bound and
        take as many steps to come back). The check reads the working copy, whole and the same on every rank
        (the parameter has one element: persistent at stage 3): no collective unless it was partitioned. In
        bf16 that copy is the master rounded, so the master may pass the bound by half a bf16 step at most."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        temp, cfg = self.module.temp, self.module.loss_cfg
        whole = self.stage < 3 or _is_persistent(temp)
        value = temp.data.float() if whole else safe_get_full_fp32_param(temp)
        clamped = value.clamp(cfg.temp_min, cfg.temp_max)
        if not torch.equal(value, clamped):
            safe_set_full_fp32_param(temp, clamped)  # every rank writes its own slice of the master

    def skip_step(self) -> None:
        """Drop whatever this step accumulated (a non-finite loss on some rank)."""
        self.optimizer.zero_grad()
        self._micro = 0

    # -- momentum encoders ---------------------------------------------------------------------------------

    def _build_ema_state(self) -> None:
        """ZeRO-3: fp32 accumulators of the momentum partitions (and of the full copy of persistent parameters)."""
        self._ema = []
        for p, ema_param in self.module.momentum_pairs():
            exact = ema_param.ds_tensor.dtype == torch.float32
            partition_fp32 = None if exact else ema_param.ds_tensor.detach().float().clone()
            full_fp32 = None if exact or not _is_persistent(ema_param) else ema_param.data.detach().float().clone()
            self._ema.append((p, ema_param, partition_fp32, full_fp32))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """ema_param <- m ema_param + (1 - m) p on what this rank holds (no communication): below stage 3 the whole weights;
        at stage 3 its partitions, and the full copy that ZeRO-3 keeps of persistent (small) parameters, which
        forward reads instead of the partition."""
        if self.replicated is not None:
            self.replicated.update()
            return
        m = self.module.loss_cfg.momentum
        for p, ema_param, partition_fp32, full_fp32 in self._ema:
            if partition_fp32 is None:
                ema_param.ds_tensor.mul_(m).add_(p.ds_tensor, alpha=1 - m)
            else:
                partition_fp32.mul_(m).add_(p.ds_tensor.float(), alpha=1 - m)
                ema_param.ds_tensor.copy_(partition_fp32)
            if _is_persistent(ema_param):
                if full_fp32 is None:
                    ema_param.data.mul_(m).add_(p.data, alpha=1 - m)
                else:
                    full_fp32.mul_(m).add_(p.data.float(), alpha=1 - m)
                    ema_param.data.copy_(full_fp32)

    def momentum_state(self) -> dict[str, torch.Tensor]:
        """The full fp32 momentum weights on rank 0 (other ranks get {}); at stage 3 gathered from every rank's
        partition (a collective)."""
        if self.replicated is not None:
            return self.replicated.state() if get_rank() == 0 else {}
        out = {}
        names = {id(ema_param): n for n, ema_param in _momentum_named(self.module)}
        for p, ema_param, partition_fp32, _ in self._ema:
            part = (ema_param.ds_tensor if partition_fp32 is None else partition_fp32).detach().float()
            parts = [torch.empty_like(part) for _ in range(get_world_size())]
            dist.all_gather(parts, part.contiguous())
            if get_rank() == 0:
                out[names[id(ema_param)]] = torch.cat(parts)[: ema_param.ds_numel].view(ema_param.ds_shape).cpu()
        return self.layout.unflatten(out) if self.layout else out  # momentum.pt keeps the original names

    @torch.no_grad()
    def load_momentum_state(self, state: dict[str, torch.Tensor]) -> None:
        """Every rank writes what it holds of the full weights (read from the shared checkpoint folder)."""
        if self.replicated is not None:
            self.replicated.load_state(state)
            return
        if self.layout:
            state = self.layout.flatten(state)
        names = {id(ema_param): n for n, ema_param in _momentum_named(self.module)}
        self._build_ema_state()
        for p, ema_param, partition_fp32, full_fp32 in self._ema:
            full = state[names[id(ema_param)]].float().reshape(-1)
            size = ema_param.ds_tensor.numel()
            chunk = torch.zeros(size, dtype=torch.float32)
            piece = full[get_rank() * size : (get_rank() + 1) * size]
            chunk[: piece.numel()] = piece
            ema_param.ds_tensor.copy_(chunk.to(ema_param.ds_tensor.device))
            if partition_fp32 is not None:
                partition_fp32.copy_(chunk.to(partition_fp32.device))
            if _is_persistent(ema_param):
                ema_param.data.copy_(full.view(ema_param.ds_shape).to(ema_param.data.device, ema_param.data.dtype))
                if full_fp32 is not None:
                    full_fp32.copy_(full.view(ema_param.ds_shape).to(full_fp32.device))

    # -- checkpoint files ------------------------------------------------------------------------------

    def save(self, folder: Path, tag: str = ENGINE_TAG) -> None:
        """DeepSpeed's sharded files (every rank writes its partitions) under folder/tag."""
        self.engine.save_checkpoint(str(folder), tag=tag, client_state={}, save_latest=False)

    def load(self, folder: Path, tag: str = ENGINE_TAG) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{folder / tag}: DeepSpeed could not load this checkpoint")


def _is_persistent(p) -> bool:
    """ZeRO-3 keeps a full copy of small parameters on every rank (stage3_param_persistence_threshold)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE


def block_gather(cfg, stage, accumulation: int) -> bool:
    """train.zero3_gather=block (or flat) at stage 3: each transformer block's weights gathered once per call of
    the block (a DeepSpeed leaf module) instead of once per Linear and LayerNorm in it, and each frozen momentum
    tower's once per call of the tower (set_gather_units). It needs one micro-batch per step
    (DeepSpeed's coalesced reduction spans one backward); with gradient accumulation, module gathering."""
    return stage == 3 and gather_mode(cfg, accumulation) in ("block", "flat") and accumulation == 1


def gather_mode(cfg, accumulation: int) -> str:
    """train.zero3_gather, with auto as a fresh job takes it (the trainer resolves auto first, from the
    checkpoint it resumes: memory_model.zero3_gather_for)."""
    return cfg.train.zero3_gather if cfg.train.zero3_gather != "auto" else fresh_zero3_gather(accumulation)


def flat_layout(cfg, stage, accumulation: int, model: torch.nn.Module) -> FlatLayout | None:
    """train.zero3_gather=flat at stage 3: gathered a block at a time, each block's weights in a few flat
    parameters (knowlip.train.param_layout). Its checkpoints resume only in the same layout, so gradient
    accumulation, which cannot gather a block at a time, is an error here rather than a quiet fallback."""
    if stage != 3 or gather_mode(cfg, accumulation) != "flat":
        return None
    if accumulation != 1:
        raise ValueError(f"train.zero3_gather=flat needs one micro-batch per step, but this job accumulates "
                         f"{accumulation} (train.global_batch_size): use train.zero3_gather=block or module")
    return FlatLayout.of(model)


def set_gather_units(model: torch.nn.Module, whole_blocks: bool) -> None:
    """What ZeRO-3 gathers in one fetch: DeepSpeed leaf modules, whose weights are gathered together around each
    call, with no hooks inside. A trained leaf has its gradients reduced from its backward hook, once per call;
    that holds for the ViT blocks (the image encoder runs once a step) and for anything frozen (the momentum
    towers run forward only). The text layers run several times a step: as leaves (`whole_blocks`,
    zero3_gather=block) only with the engine's one coalesced reduction after backward, else a module at a time.
    With `whole_blocks` each momentum tower is gathered whole, else a block at a time (the memory-lean way)."""
    from deepspeed.utils import set_z3_leaf_module

    from knowlip.model.text import TextLayer
    from knowlip.model.vit import VitBlock

    trained = (VitBlock, TextLayer) if whole_blocks else (VitBlock,)
    leaves = [module for module in model.modules() if isinstance(module, trained)]
    for tower in model.momentum_towers():
        leaves += [tower] if whole_blocks else [module for module in tower.modules() if isinstance(module, TextLayer)]
    for module in leaves:
        set_z3_leaf_module(module, True)


def build_engine(model: torch.nn.Module, cfg, device: torch.device, bf16: bool, accumulation: int,
                 universal: bool = False):
    """The engine of cfg.train.engine. train.precision=bf16_weights is the plain engine's bf16 working weights
    with float32 masters; ZeRO-3's bf16 mode already works that way (bf16 is then enough)."""
    if cfg.train.engine == "plain":
        return PlainEngine(model, cfg, device, bf16, accumulation, cfg.train.precision == "bf16_weights")
    return ZeroEngine(model.to(device), cfg, device, bf16, accumulation, universal)

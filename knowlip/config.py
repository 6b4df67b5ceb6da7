"""Typed configuration: built-in defaults <- YAML file <- command-line dotlist.

Only this module knows the defaults. Every section is a dataclass; `load_config` merges the layers with
omegaconf and validates them before anything heavy starts: an unknown key fails with its full path and, for
a likely typo, the closest valid key; a value of the wrong type fails with its path and the expected type.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knowlip.choices import ATTENTION_BACKENDS, CAPTION_FIELDS, MODEL_SIZES, SAR_PRODUCTS
from knowlip.redact import literal_secrets, redact_tree


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the source."""


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """`knowlip synth`: procedurally generated SAR scenes with content-derived captions."""

    out_dir: str = "runs/quickstart/scenes"
    num_scenes: int = 32
    size: int = 256  # pixels per side
    pixel_spacing_m: float = 10.0
    polarisations: list[str] = field(default_factory=lambda: ["VV"])
    # "intensity" (linear sigma0), "amplitude", "db", "complex", "dn" (uint16 with a calibration gain);
    # scenes cycle through this list so one run can exercise several product kinds.
    products: list[str] = field(default_factory=lambda: ["intensity"])
    looks: float = 4.0  # speckle: gamma-distributed intensity with this equivalent number of looks
    seed: int = 0
    # Known caption noise, to measure SCIO against: this share of the captioned samples gets one clause (of
    # `noise_clauses`) replaced by another value that field takes in the same world. Which clause and its true
    # text are written beside the caption (captions.jsonl "noise"), packed into the sample's metadata
    # ("caption_noise"), never into the caption the model reads.
    caption_noise: float = 0.0
    noise_clauses: list[str] = field(default_factory=lambda: list(CAPTION_FIELDS))


@dataclass
class ChipConfig:
    """How scenes are tiled into training chips."""

    size: int = 64
    stride: int = 64
    min_valid_fraction: float = 0.5


@dataclass
class ReadConfig:
    """How GeoTIFFs are interpreted when their tags do not say."""

    # auto: from tags / file name / dtype; else one of intensity, amplitude, db, complex, dn.
    product: str = "auto"
    # Polarisation names for the bands, in order, when descriptions and tags lack them (e.g. ["VV", "VH"]).
    band_names: list[str] = field(default_factory=list)


@dataclass
class PackConfig:
    """`knowlip pack`: GeoTIFFs + caption JSONL -> WebDataset tar shards + index.json."""

    inputs: list[str] = field(default_factory=lambda: ["runs/quickstart/scenes"])
    captions: Optional[str] = None  # JSONL; default: <first input dir>/captions.jsonl when it exists
    out_dir: str = "runs/quickstart/shards"
    shard_max_samples: int = 256
    shard_max_bytes: int = 256 * 2**20
    jobs: int = 1  # processes reading and encoding scenes (the output is identical for any number)
    # Replace the dataset already in out_dir (swapped in once the new one is complete); without it a non-empty
    # out_dir is refused.
    overwrite: bool = False
    # What to do with a chip whose scene/chip has no caption: "skip" it, or keep it with a caption made of the
    # geographic clause only ("geo_only").
    missing_caption: str = "skip"
    geo_clause: bool = True  # append "Located at ..." built from the chip's metadata
    # A scene with more values than this (width x height x bands) is skipped and listed, not read: a corrupt or
    # absurd header would otherwise ask for hundreds of GiB. 2**31 values: 8 GiB of float32.
    max_scene_values: int = 2**31
    read: ReadConfig = field(default_factory=ReadConfig)
    chip: ChipConfig = field(default_factory=ChipConfig)


@dataclass
class DataConfig:
    """The streaming loader (shards -> batches)."""

    shards: str = "runs/quickstart/shards"  # a folder holding index.json
    batch_size: int = 16
    num_workers: int = 0
    seed: int = 0
    # Samples are shuffled inside consecutive blocks of the epoch's canonical order (which itself follows a
    # per-epoch shard permutation). Larger blocks mix more shards per batch at no memory cost.
    shuffle_block: int = 8192
    drop_last: bool = True
    max_text_len: int = 128
    prefetch_factor: int = 4


@dataclass
class StorageConfig:
    """Shards on object storage: `data.shards`, `eval.shards` and `pack.out_dir` may be fsspec URLs such as
    s3://bucket/prefix. Endpoint and credentials from `options` or the environment (AWS_ENDPOINT_URL_S3,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""

    options: dict[str, Any] = field(default_factory=dict)  # fsspec filesystem arguments, e.g. endpoint_url
    retries: int = 5  # per request after the first try: 5xx answers, timeouts, dropped connections
    backoff_s: float = 0.2  # first wait before a retry; doubles each time (with jitter), at most 10 s
    coalesce_gap_bytes: int = 1048576  # samples of one shard closer than this are read in one request
    requests_in_flight: int = 8  # concurrent range requests per loader process
    # fsspec protocols allowed beside file, s3, gs and az (and their aliases), e.g. ["http"]: a config names
    # every other place a job may read from or write to.
    extra_protocols: list[str] = field(default_factory=list)


@dataclass
class NormConfig:
    """SAR log-intensity normalisation (raw chip -> normalised image), done on the device."""

    # Clip range in dB per polarisation; unknown polarisations use `default_clip_db`.
    clip_db: dict[str, list[float]] = field(
        default_factory=lambda: {"VV": [-25.0, 0.0], "VH": [-32.5, 0.0], "HH": [-25.0, 0.0], "HV": [-32.5, 0.0]}
    )
    default_clip_db: list[float] = field(default_factory=lambda: [-25.0, 0.0])
    mode: str = "scale"  # "scale" to [0, 1] or "standardise" with mean/std (in clipped dB)
    mean_db: dict[str, float] = field(default_factory=dict)
    std_db: dict[str, float] = field(default_factory=dict)
    fill: float = 0.0  # value written where the input is invalid (NaN, inf, nodata, non-positive intensity)
    out_dtype: str = "float32"  # or "bfloat16"
    dn_gain: float = 1.0  # uint16 digital numbers: intensity = dn_gain * dn**2


@dataclass
class LossConfig:
    """Weights and constants of the losses (method.md; the paper's values as defaults)."""

    itc_weight: float = 1.0
    itm_weight: float = 1.0
    recon_weight: float = 1.0
    momentum: float = 0.995  # EMA of the momentum encoders
    alpha: float = 0.4  # momentum-distillation weight, ramped up linearly from 0 over train.alpha_ramp_steps
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    other_mask_prob: float = 0.05  # non-keyword tokens masked for reconstruction (keywords: always)
    # The geographic clause ("Located at 43.59N 4.52E (EPSG:32631), imaged by S1A VV on 2015-03-09") is a keyword
    # span too; masking it always asks the decoder to read coordinates, EPSG code, sensor and date from pixels,
    # which it cannot. Off: the clause stays in the ITC/ITM text and is masked only at other_mask_prob like any
    # non-keyword token. On: masked with the eight clauses' keywords (knowlip before it was a setting).
    mask_geo_clause: bool = False
    # ITM hard negatives, drawn per row with weights from the batch similarities. "blip_pretrain" (BLIP's
    # pretraining code): softmax over the whole row + 1e-4, then the positive (and same-caption columns) zeroed,
    # so every negative keeps a small chance. "blip_retrieval" (BLIP's retrieval fine-tuning, knowlip before):
    # softmax over the allowed negatives only.
    itm_negatives: str = "blip_pretrain"
    label_smoothing: float = 0.1
    # ITC columns: "momentum" is BLIP's (the batch's momentum features, then the queue). "online" (the batch's
    # online features with grad, then the queue) is an ablation: knowlip's form before it followed BLIP.
    itc_columns: str = "momentum"


@dataclass
class ModelConfig:
    """Model size preset, attention backend, pretrained weights and losses."""

    size: str = "tiny"  # tiny | base | large
    attention: str = "auto"  # auto | flash_attn | sdpa | reference
    image_size: int = 64
    in_channels: int = 1
    tokenizer: Optional[str] = None  # a local Hugging Face tokenizer folder; None: train one on the captions
    pretrained_text: Optional[str] = None  # local HF BERT-family folder
    pretrained_vision: Optional[str] = None  # local safetensors file
    queue_size: Optional[int] = None  # None: the preset's (57,600 for base, as in the paper)
    text_dropout: Optional[float] = None  # None: the preset's (0.1, BERT's and BLIP's); hidden + attention probs
    drop_path: Optional[float] = None  # ViT stochastic depth; None: the preset's (0 for tiny/base, 0.1 for large)
    losses: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainConfig:
    steps: int = 40
    lr: float = 3e-4
    min_lr: float = 1e-6  # the cosine decays to this at train.steps (BLIP's floor); 0 decays to nothing
    # AdamW with betas (0.9, 0.98), not BLIP's (0.9, 0.999): the shorter second-moment memory of CLIP and open_clip,
    # which keeps large-batch contrastive training stable when the similarity logits sharpen. No decay on biases,
    # norm gains, position/class embeddings and the temperature (BLIP decays all): decay pulls a value to 0, and
    # for a norm gain or the temperature that changes the function rather than regularising it (open_clip's rule).
    weight_decay: float = 0.05
    warmup_steps: float = 5  # steps, or below 1 a fraction of train.steps (0.02: the first 2% of the run)
    grad_clip: float = 0.0  # max global grad norm; 0 = off (set explicitly: DeepSpeed silently defaults to 1.0)
    # Distillation weight ramps from exactly 0 at step 0 to model.losses.alpha over these steps (or, below 1, this
    # fraction of the run; BLIP: the first two epochs of its 20).
    alpha_ramp_steps: float = 20
    log_every: int = 5
    device: str = "auto"  # auto | cpu | cuda
    # auto (bf16 on GPU, fp32 on CPU) | bf16 | bf16_weights | fp32. bf16 with the plain engine is autocast
    # (float32 weights); bf16_weights keeps the weights in bf16 with float32 masters (faster; ZeRO-3's bf16 is this).
    precision: str = "auto"
    tokenizer_vocab: int = 2048  # WordPiece vocabulary trained on the captions when model.tokenizer is unset
    engine: str = "deepspeed"  # deepspeed (DeepSpeed ZeRO, any number of ranks) | plain (torch AdamW, one process)
    # The deepspeed engine's ZeRO stage: 3 partitions the weights too (the largest models fit; a gather around
    # every module call); 1 and 2 keep the weights whole on every rank (faster where they fit, BENCHMARKS.md).
    # auto: the lowest stage whose model states + estimated activations fit the GPU (knowlip.train.memory_model);
    # ZeRO-3 on a CPU; a resumed run keeps its saved stage. The choice and its reason are logged and recorded.
    zero_stage: Any = "auto"
    # ZeRO-3's weight gathering. "flat": a block at a time (below), each block's weights in a few flat parameters
    # (knowlip.train.param_layout): the same losses bit for bit, 0.54x the Python calls of "block" a step on tiny,
    # 0.37x on base (BENCHMARKS.md); its checkpoints resume only as flat. "block": a ViT block's or text layer's
    # weights once per call of it and a frozen momentum tower's whole, one weight per parameter; all gradients
    # reduced in one pass after backward (whole gradients live until then) and torch's linear (gathered weights
    # kept for backward): more memory than ZeRO-2, so zero_stage=auto, where it lands on ZeRO-3, gathers a module
    # at a time. "module": once per Linear and LayerNorm (DeepSpeed's way), the ViT blocks and the momentum
    # towers' blocks whole; also the mode with gradient accumulation (flat and block need one micro-batch a step).
    # "auto": flat; a run resumed from a checkpoint with one weight per parameter keeps it (block); module with
    # gradient accumulation. The choice and its reason are logged.
    zero3_gather: str = "auto"
    # Samples per optimiser step over all ranks; None = data.batch_size x world size (no accumulation).
    # Must be a multiple of data.batch_size x world size: the quotient is the gradient-accumulation count.
    global_batch_size: Optional[int] = None
    # Stop after this step with a checkpoint and exit 0, as a preemption would (the schedule follows `steps`).
    stop_at: Optional[int] = None
    activation_checkpointing: bool = False  # recompute ViT blocks and text layers in backward
    compile: bool = False  # torch.compile each transformer block
    max_nonfinite_in_a_row: int = 5  # this many skipped non-finite steps in a row stop the run (with a checkpoint)
    progress: bool = True  # a progress bar on rank 0 (stderr)


@dataclass
class DistConfig:
    """Ranks on this node and how they talk."""

    nproc_per_node: str = "auto"  # auto: one per visible GPU, 2 on a CPU-only machine; or a number
    backend: str = "auto"  # auto: nccl on GPUs, gloo on CPU
    # Collective timeout: the last resort when one rank dies and nothing else ends the others (the local launcher,
    # torchrun and `srun --kill-on-bad-exit` normally do, in seconds). Longer than any single collective wait,
    # including rank 0 hashing a checkpoint at a save (about 1.5 GiB/s).
    timeout_s: int = 300


@dataclass
class CheckpointConfig:
    """Sharded checkpoints under <run_dir>/checkpoints (or `dir`)."""

    every: int = 0  # steps between checkpoints; 0 = only at the end, at train.stop_at and on a signal
    keep: int = 3  # complete checkpoints kept (the newest)
    dir: Optional[str] = None


@dataclass
class ScioConfig:
    """Self-consistent iterative optimisation (method.md): the model screens and repairs its own captions."""

    enabled: bool = True  # false: phase 1 (plain training) throughout
    # First steps of phase 2 (screen + filter) and phase 3 (repair) as fractions of train.steps. The paper
    # trains three equal phases; the fractions are our choice of how to express that.
    phase_starts: list[float] = field(default_factory=lambda: [0.333, 0.667])
    samples_every: int = 20  # append a few (original, filtered, repaired) captions to scio_samples.jsonl; 0 = off
    samples_per_write: int = 3


@dataclass
class EvalConfig:
    """Zero-shot evaluation during training (knowlip.eval): retrieval and clause-prompt classification."""

    shards: Optional[str] = None  # held-out shard folder; None = no evaluation during training
    every: int = 0  # steps between evaluations (0: only at the end)
    batch_size: int = 64
    fields: list[str] = field(default_factory=lambda: ["water", "terrain"])  # clauses to classify by


@dataclass
class MlflowConfig:
    """Experiment tracking (knowlip.track): on by default, into a local store beside the run folders."""

    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<runs>/mlflow.db with artifacts in <runs>/mlartifacts, where
    # <runs> is the folder holding run_dir.
    tracking_uri: Optional[str] = None
    experiment: str = "knowlip"
    run_name: Optional[str] = None  # None: the run folder's name
    system_metrics: bool = True  # CPU, memory, GPU per node (local rank 0 of each node)
    system_interval_s: float = 10.0
    queue_size: int = 10000  # metric rows held while the server is away; older ones are dropped (and counted)
    retry_s: float = 5.0  # wait between attempts while the server is away
    # At the end of a run (train.steps reached), register the model under this name in the Model Registry, as
    # `knowlip export RUN --format hf --register NAME` does; None: not registered.
    register_as: Optional[str] = None


@dataclass
class LogConfig:
    """What a job prints (knowlip.logging_setup): one format, `time LEVEL [rank N] message`, on stderr."""

    level: str = "INFO"  # DEBUG also shows DeepSpeed's and MLflow's INFO lines (WARNING and up otherwise)
    all_ranks: bool = False  # INFO from every rank, not only rank 0 (warnings and errors always)
    json: Optional[str] = None  # also write every record as a JSON line here (other ranks: NAME.rankN.EXT)


@dataclass
class KnowlipConfig:
    run_dir: str = "runs/quickstart"
    seed: int = 0
    # auto: the checkpoint `latest` names (a requeue's choice); a checkpoint folder: start a new branch there (what
    # was saved after it is set aside); none: a fresh start, refused where the run already has a history;
    # restart: move that history aside, then start afresh.
    resume: str = "auto"
    synth: SynthConfig = field(default_factory=SynthConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scio: ScioConfig = field(default_factory=ScioConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Passed through to DeepSpeed's config for what knowlip does not model (merged over what knowlip sets).
    deepspeed: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------

CHOICES: dict[str, tuple[str, ...]] = {
    "synth.products": SAR_PRODUCTS,
    "synth.noise_clauses": CAPTION_FIELDS,
    "pack.read.product": ("auto", *SAR_PRODUCTS),
    "pack.missing_caption": ("skip", "geo_only"),
    "norm.mode": ("scale", "standardise"),
    "norm.out_dtype": ("float32", "bfloat16"),
    "model.size": MODEL_SIZES,
    "model.attention": ATTENTION_BACKENDS,
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "bf16", "bf16_weights", "fp32"),
    "train.engine": ("deepspeed", "plain"),
    "train.zero3_gather": ("auto", "flat", "block", "module"),
    "model.losses.itc_columns": ("momentum", "online"),
    "model.losses.itm_negatives": ("blip_pretrain", "blip_retrieval"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "eval.fields": CAPTION_FIELDS,
    "log.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}


def default_config() -> DictConfig:
    return OmegaConf.structured(KnowlipConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge defaults <- YAML file <- dotlist overrides, validate, and return a read-only config."""
    cfg = default_config()
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"command-line override {bad[0]!r} is not of the form key=value")
        try:
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line: cannot parse overrides: {exc}") from exc
    for source, layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        _check_keys(cfg, layer, source, prefix="")
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise ConfigError(f"{source}: bad value for '{key}': {_first_line(exc)}") from exc
    _check_choices(cfg)
    _check_ranges(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def replaced(cfg: DictConfig, key: str, value) -> DictConfig:
    """A read-only copy of `cfg` with `key` (dotted) set to `value`: a value resolved while a job starts."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    OmegaConf.update(out, key, value)
    OmegaConf.set_readonly(out, True)
    return out


def public_tree(cfg: DictConfig, resolve: bool = True) -> dict:
    """The config as a plain dict with every secret masked (knowlip.redact): what may be printed, logged, sent
    to MLflow or written."""
    return redact_tree(OmegaConf.to_container(cfg, resolve=resolve))


def to_yaml(cfg: DictConfig, resolve: bool = False) -> str:
    """The config as YAML, secrets masked. Interpolations (`${oc.env:...}`) stay as written, to be resolved
    where the config is loaded again (the job's node); `resolve=True` shows their values (`config show`)."""
    return OmegaConf.to_yaml(OmegaConf.create(public_tree(cfg, resolve)))


def check_no_literal_secrets(cfg: DictConfig, what: str) -> None:
    """Refuse a config whose secrets are written out where `what` would carry them to disk (a Slurm job's
    pickle): they must come from the environment of the job."""
    found = literal_secrets(OmegaConf.to_container(cfg, resolve=False))
    if found:
        raise ConfigError(f"'{found[0]}' holds a secret written out, and {what} would write it to disk: give it "
                          f"from the environment instead, e.g. {found[0]}='${{oc.env:NAME}}' with NAME set where "
                          "you submit (Slurm passes your environment to the job)")


def _check_keys(schema: DictConfig, layer: DictConfig, source: str, prefix: str) -> None:
    """Fail on any key of `layer` the schema does not have, suggesting the closest valid key."""
    for key in layer.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            # dict-typed fields (e.g. norm.clip_db) accept any key: omegaconf types their values.
            if _is_open_dict(schema):
                continue
            valid = [str(k) for k in schema.keys()]
            hint = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            suggestion = f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; valid keys here: {', '.join(valid)}"
            raise ConfigError(f"{source}: unknown config key '{path}'{suggestion}")
        sub_schema = schema._get_node(key)
        sub_layer = layer._get_node(key)
        if isinstance(sub_schema, DictConfig) and isinstance(sub_layer, DictConfig) and not _is_open_dict(sub_schema):
            _check_keys(sub_schema, sub_layer, source, prefix=f"{path}.")


def _is_open_dict(node: DictConfig) -> bool:
    """A Dict[str, X] field rather than a dataclass section."""
    return OmegaConf.get_type(node) is dict


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        values = list(value) if isinstance(value, ListConfig) else [value]
        for v in values:
            if v not in allowed:
                hint = difflib.get_close_matches(str(v), allowed, n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(f"bad value for '{key}': {v!r} is not one of {', '.join(allowed)}{extra}")


AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
POSITIVE = (lambda v: v > 0, "positive")
SEED = (lambda v: 0 <= v < 2**32, "in [0, 2**32)")
OFF_OR_POSITIVE = (lambda v: v >= 0, "0 (off) or positive")
STEPS_OR_FRACTION = (lambda v: v >= 0 and (v < 1 or v == int(v)), "a whole number of steps or a fraction < 1")

# key -> (predicate, what it must be); checked after merging, before anything runs.
RANGES: dict[str, tuple] = {
    "seed": SEED,
    "synth.num_scenes": AT_LEAST_1,
    "synth.pixel_spacing_m": POSITIVE,
    "synth.looks": POSITIVE,
    "synth.seed": SEED,
    "synth.caption_noise": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "pack.jobs": AT_LEAST_1,
    "pack.max_scene_values": AT_LEAST_1,
    "synth.size": (lambda v: v >= 8, "at least 8"),
    "pack.chip.size": AT_LEAST_1,
    "pack.chip.stride": AT_LEAST_1,
    "pack.chip.min_valid_fraction": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "pack.shard_max_samples": AT_LEAST_1,
    "pack.shard_max_bytes": (lambda v: v >= 1024, "at least 1024"),
    "data.batch_size": AT_LEAST_1,
    "data.seed": SEED,
    "data.num_workers": (lambda v: v >= 0, "0 or more"),
    "data.shuffle_block": AT_LEAST_1,
    "data.max_text_len": (lambda v: v >= 8, "at least 8"),
    "data.prefetch_factor": AT_LEAST_1,
    "storage.retries": (lambda v: v >= 0, "0 or more"),
    "storage.backoff_s": (lambda v: v >= 0, "0 or more"),
    "storage.requests_in_flight": AT_LEAST_1,
    "storage.coalesce_gap_bytes": (lambda v: v >= 0, "0 (off) or more"),
    "norm.fill": (lambda v: math.isfinite(v), "a finite number"),
    "norm.dn_gain": POSITIVE,
    "model.in_channels": (lambda v: 1 <= v <= 8, "between 1 and 8"),
    "model.image_size": (lambda v: v >= 8, "at least 8"),
    "model.losses.itc_weight": (lambda v: v >= 0, "0 or more"),
    "model.losses.itm_weight": (lambda v: v >= 0, "0 or more"),
    "model.losses.recon_weight": (lambda v: v >= 0, "0 or more"),
    "model.losses.temp_min": POSITIVE,
    "model.losses.temp_init": POSITIVE,
    "model.losses.temp_max": POSITIVE,
    "model.losses.momentum": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "model.losses.alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "model.losses.other_mask_prob": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "model.losses.label_smoothing": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.steps": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.min_lr": (lambda v: v >= 0, "0 or more"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.tokenizer_vocab": (lambda v: v >= 128, "at least 128 (special tokens and the caption alphabet)"),
    "train.warmup_steps": STEPS_OR_FRACTION,
    "train.alpha_ramp_steps": STEPS_OR_FRACTION,
    "train.log_every": AT_LEAST_1,
    "train.grad_clip": OFF_OR_POSITIVE,
    "train.max_nonfinite_in_a_row": AT_LEAST_1,
    "train.zero_stage": (lambda v: v in ("auto", 1, 2, 3), "auto, 1, 2 or 3"),
    "dist.nproc_per_node": (lambda v: v == "auto" or (v.isdigit() and int(v) >= 1), "'auto' or a positive integer"),
    "dist.timeout_s": (lambda v: v >= 10, "at least 10"),
    "ckpt.every": OFF_OR_POSITIVE,
    "ckpt.keep": AT_LEAST_1,
    "eval.every": (lambda v: v >= 0, "0 (only at the end) or positive"),
    "eval.batch_size": AT_LEAST_1,
    "scio.samples_every": OFF_OR_POSITIVE,
    "scio.samples_per_write": AT_LEAST_1,
    "mlflow.system_interval_s": (lambda v: v >= 0.1, "at least 0.1"),
    "mlflow.queue_size": AT_LEAST_1,
    "mlflow.retry_s": (lambda v: v >= 0.1, "at least 0.1"),
}


def _check_ranges(cfg: DictConfig) -> None:
    for key, (ok, expected) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"bad value for '{key}': {value!r} must be {expected}")
    for pol, bounds in list(cfg.norm.clip_db.items()) + [("default", cfg.norm.default_clip_db)]:
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise ConfigError(f"bad value for the norm clip range of {pol}: {list(bounds)} must be [low, high] dB "
                              "with low < high")
    for key in ("train.global_batch_size", "train.stop_at"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"bad value for '{key}': {value} must be at least 1 (or null)")
    gbs = cfg.train.global_batch_size
    if gbs is not None and gbs % cfg.data.batch_size:
        raise ConfigError(f"bad value for 'train.global_batch_size': {gbs} is not a multiple of data.batch_size="
                          f"{cfg.data.batch_size}")
    starts = list(cfg.scio.phase_starts)
    if len(starts) != 2 or not 0.0 <= starts[0] <= starts[1] <= 1.0:
        raise ConfigError(f"bad value for 'scio.phase_starts': {starts} must be two fractions of train.steps, "
                          "0 <= phase 2 start <= phase 3 start <= 1")
    for key in ("model.text_dropout", "model.drop_path"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"bad value for '{key}': {value} must be in [0, 1) (or null for the preset)")
    losses = cfg.model.losses
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"bad value for train.min_lr: {cfg.train.min_lr} is above train.lr={cfg.train.lr} (the "
                          "cosine decays from lr to min_lr)")
    if not losses.temp_min <= losses.temp_init <= losses.temp_max:
        raise ConfigError(f"bad values for the temperature: model.losses.temp_min={losses.temp_min} <= temp_init="
                          f"{losses.temp_init} <= temp_max={losses.temp_max} does not hold")
    queue = cfg.model.queue_size
    if queue is not None and queue < 1:
        raise ConfigError(f"bad value for 'model.queue_size': {queue} must be at least 1 (or null for the preset)")


def global_batch(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(samples per optimiser step over all ranks, micro-batches per step): the one place the batch arithmetic
    is done. Fails (before any process group exists) when train.global_batch_size cannot be split evenly over
    `world_size` ranks of data.batch_size samples."""
    per_pass = cfg.data.batch_size * world_size
    gbs = cfg.train.global_batch_size
    if gbs is None:
        return per_pass, 1
    if gbs % per_pass:
        raise ConfigError(f"train.global_batch_size={gbs} cannot be split over {world_size} rank(s) x "
                          f"data.batch_size={cfg.data.batch_size}: it must be a multiple of {per_pass}")
    return gbs, gbs // per_pass


def accumulation_steps(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimiser step (see global_batch)."""
    return global_batch(cfg, world_size)[1]


def schedule_steps(value: float, total_steps: int) -> int:
    """train.warmup_steps / train.alpha_ramp_steps: a step count, or below 1 a fraction of the run."""
    return round(value * total_steps) if 0 < value < 1 else int(value)


def run_identity(cfg: DictConfig | dict) -> dict:
    """The config as a plain dict, less what may change between a run and its resume (how many ranks, where it
    resumes from, where it stops, the progress bar, credentials: rotating a key is not a config change)."""
    plain = public_tree(cfg) if isinstance(cfg, DictConfig) else redact_tree(copy.deepcopy(cfg))
    for key in ("resume", "dist"):
        plain.pop(key, None)
    plain["train"].pop("stop_at", None)
    plain["train"].pop("progress", None)
    return plain


def config_hash(cfg: DictConfig | dict) -> str:
    """A short hash of what determines the training run (`run_identity`)."""
    import hashlib

    return hashlib.sha256(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(old: DictConfig | dict, new: DictConfig | dict) -> list[str]:
    """'key: old -> new' for every difference between two configs' run identities."""
    return _changes(run_identity(old), run_identity(new))


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]

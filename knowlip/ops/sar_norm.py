"""SAR log-intensity normalisation: one definition, two implementations.

`sar_normalize(x, params)` turns a batch of raw chips into normalised log-intensity and a validity mask.
On a CUDA tensor it runs the fused kernel of kernels/sar_norm.cu (built on first use, cached); anywhere else,
or when the kernel cannot be built, it runs `reference`, plain vectorised torch and the tests' oracle.

Input layouts (B, C, H, W): float32 with a per-channel product kind (intensity, amplitude or dB),
complex64, uint16 digital numbers (intensity = gain * dn**2), or (B, C, H, W, 2) interleaved int16 / float32
complex pairs. Invalid pixels get `fill` and mask False: NaN or inf (in either part of a complex pixel),
nodata (a complex pixel when both parts equal it), non-positive intensity (zero and negative dB are ordinary
values). knowlip.ops.sar_cases spells these rules out per input kind.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from knowlip.choices import SAR_PRODUCTS

log = logging.getLogger(__name__)

PRODUCT_CODES = {product: code for code, product in enumerate(SAR_PRODUCTS)}  # kernels/sar_norm.cuh's kinds
MAX_CHANNELS = 8
IN_FLOAT, IN_COMPLEX_FLOAT, IN_COMPLEX_INT16, IN_UINT16 = range(4)


@dataclass(frozen=True)
class NormParams:
    """Per-channel parameters of the normalisation (one entry per channel)."""

    products: tuple[str, ...]
    clip_db: tuple[tuple[float, float], ...]
    mode: str = "scale"  # scale | standardise
    mean_db: tuple[float, ...] = ()
    std_db: tuple[float, ...] = ()
    gain: tuple[float, ...] = ()  # uint16 DN only
    nodata: float | None = None
    fill: float = 0.0
    out_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        c = len(self.products)
        if not 1 <= c <= MAX_CHANNELS:
            raise ValueError(f"sar_normalize supports 1..{MAX_CHANNELS} channels, got {c}")
        bad = [p for p in self.products if p not in PRODUCT_CODES]
        if bad:
            raise ValueError(f"unknown product kind {bad[0]!r}; expected one of {', '.join(PRODUCT_CODES)}")
        if len(self.clip_db) != c:
            raise ValueError(f"clip_db has {len(self.clip_db)} entries for {c} channels")
        for lo, hi in self.clip_db:
            if not lo < hi:
                raise ValueError(f"clip range [{lo}, {hi}] dB is empty")
        if self.mode not in ("scale", "standardise"):
            raise ValueError(f"mode must be 'scale' or 'standardise', not {self.mode!r}")
        if self.mode == "standardise":
            if len(self.mean_db) != c or len(self.std_db) != c or min(self.std_db) <= 0:
                raise ValueError("standardise needs mean_db and a positive std_db for every channel")
        if self.gain and len(self.gain) != c:
            raise ValueError(f"gain has {len(self.gain)} entries for {c} channels")
        if self.out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"out_dtype must be float32 or bfloat16, not {self.out_dtype}")

    @property
    def channels(self) -> int:
        return len(self.products)

    def affine(self) -> tuple[list[float], list[float]]:
        """(offset, scale) per channel: out = (clipped_db - offset) * scale."""
        if self.mode == "scale":
            return [lo for lo, _ in self.clip_db], [1.0 / (hi - lo) for lo, hi in self.clip_db]
        return list(self.mean_db), [1.0 / s for s in self.std_db]

    def gains(self) -> list[float]:
        return list(self.gain) if self.gain else [1.0] * self.channels


def params_from_config(norm_cfg, polarisations: Sequence[str], product: str, gain: float | None = None) -> NormParams:
    """NormParams for chips of `product` with these polarisations, from the `norm` config section."""
    clip = tuple(tuple(float(v) for v in norm_cfg.clip_db.get(p, norm_cfg.default_clip_db)) for p in polarisations)
    mean = std = ()
    if norm_cfg.mode == "standardise":
        missing = [p for p in polarisations if p not in norm_cfg.mean_db or p not in norm_cfg.std_db]
        if missing:
            raise ValueError(f"norm.mode=standardise needs norm.mean_db.{missing[0]} and norm.std_db.{missing[0]}")
        mean = tuple(float(norm_cfg.mean_db[p]) for p in polarisations)
        std = tuple(float(norm_cfg.std_db[p]) for p in polarisations)
    g = float(gain if gain is not None else norm_cfg.dn_gain)
    return NormParams(products=(product,) * len(polarisations), clip_db=clip, mode=norm_cfg.mode, mean_db=mean,
                      std_db=std, gain=(g,) * len(polarisations), fill=float(norm_cfg.fill),
                      out_dtype=torch.bfloat16 if norm_cfg.out_dtype == "bfloat16" else torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Reference (CPU, any device): vectorised torch
# ----------------------------------------------------------------------------------------------------------


def input_kind(x: torch.Tensor) -> int:
    """Which input layout `x` is; raises for anything else."""
    if x.is_complex():
        if x.dtype != torch.complex64 or x.dim() != 4:
            raise ValueError(f"complex input must be complex64 (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        return IN_COMPLEX_FLOAT
    if x.dim() == 5 and x.shape[-1] == 2 and x.dtype in (torch.int16, torch.float32):
        return IN_COMPLEX_INT16 if x.dtype == torch.int16 else IN_COMPLEX_FLOAT
    if x.dim() == 4 and x.dtype == torch.float32:
        return IN_FLOAT
    if x.dim() == 4 and x.dtype == torch.uint16:
        return IN_UINT16
    raise ValueError(f"unsupported raw chip layout {x.dtype} {tuple(x.shape)}: expected float32/uint16/complex64 "
                     "(B, C, H, W) or int16/float32 (B, C, H, W, 2)")


def _check_kinds(kind: int, p: NormParams) -> None:
    allowed = {IN_FLOAT: {"intensity", "amplitude", "db"}, IN_COMPLEX_FLOAT: {"complex"},
               IN_COMPLEX_INT16: {"complex"}, IN_UINT16: {"dn"}}[kind]
    bad = [prod for prod in p.products if prod not in allowed]
    if bad:
        raise ValueError(f"product {bad[0]!r} does not match the input layout (expects {sorted(allowed)})")


def reference(x: torch.Tensor, p: NormParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantics, in float32 torch: (normalised values in p.out_dtype, validity mask)."""
    kind = input_kind(x)
    _check_kinds(kind, p)
    if x.shape[1] != p.channels:
        raise ValueError(f"input has {x.shape[1]} channels, params have {p.channels}")
    per_channel = lambda values: torch.tensor(values, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    nodata_hit = None
    if kind in (IN_COMPLEX_FLOAT, IN_COMPLEX_INT16):
        z = torch.view_as_real(x) if x.is_complex() else x
        re, im = z[..., 0].float(), z[..., 1].float()
        intensity = re * re + im * im
        db = 10.0 * torch.log10(intensity)
        valid = torch.isfinite(intensity) & (intensity > 0)
        nodata_hit = (re == p.nodata) & (im == p.nodata) if p.nodata is not None else None
    elif kind == IN_UINT16:
        dn = x.to(torch.int32).float()
        intensity = per_channel(p.gains()) * dn * dn
        db = 10.0 * torch.log10(intensity)
        valid = torch.isfinite(intensity) & (intensity > 0)
        nodata_hit = dn == p.nodata if p.nodata is not None else None
    else:
        codes = per_channel([PRODUCT_CODES[prod] for prod in p.products])
        is_db = codes == PRODUCT_CODES["db"]
        log = torch.log10(x)
        db = torch.where(is_db, x, torch.where(codes == PRODUCT_CODES["amplitude"], 20.0 * log, 10.0 * log))
        valid = torch.isfinite(x) & (is_db | (x > 0))
        nodata_hit = x == p.nodata if p.nodata is not None else None
    if nodata_hit is not None:
        valid &= ~nodata_hit
    lo, hi = per_channel([c[0] for c in p.clip_db]), per_channel([c[1] for c in p.clip_db])
    offset, scale = p.affine()
    out = (torch.minimum(torch.maximum(db, lo), hi) - per_channel(offset)) * per_channel(scale)
    out = torch.where(valid, out, torch.full_like(out, p.fill))
    return out.to(p.out_dtype), valid


# ----------------------------------------------------------------------------------------------------------
# CUDA kernel (built on first use) and dispatch
# ----------------------------------------------------------------------------------------------------------


def kernel_sources() -> list[Path]:
    """The .cu and binding .cpp, from the installed package (knowlip._kernels) or the checkout."""
    try:
        import knowlip._kernels as pkg

        root = Path(pkg.__file__).parent
    except ImportError:  # a checkout on sys.path, not installed (the GPU check machines)
        root = Path(__file__).resolve().parents[2] / "kernels"
    return [root / "sar_norm.cu", root / "sar_norm_binding.cpp"]


_build_lock = threading.Lock()


@lru_cache(maxsize=1)
def _cuda_extension():
    """Compile (or load from torch's extension cache) the kernel; None when that is impossible here."""
    if not torch.cuda.is_available():
        return None
    with _build_lock:
        try:
            from torch.utils.cpp_extension import load

            return load(name="knowlip_sar_norm", sources=[str(s) for s in kernel_sources()],
                        extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)
        except Exception as exc:  # no toolchain, incompatible CUDA: fall back, loudly
            log.warning("fused SAR kernel unavailable (%s); using the torch reference", exc)
            return None


def kernel_available() -> bool:
    return _cuda_extension() is not None


def sar_normalize(x: torch.Tensor, p: NormParams, use_kernel: bool = True, out: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None,
                  launch: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised log-intensity and validity mask; the fused kernel on CUDA tensors, the reference otherwise.

    `out` and `mask` may be given (preallocated, contiguous, (B, C, H, W)) to write into. `launch` is for tuning
    only: (vectors in flight per thread, blocks per SM), 0 = the kernel's default (bench/kernels.py --tune).
    """
    ext = _cuda_extension() if (use_kernel and x.is_cuda) else None
    if ext is None:
        result, valid = reference(x, p)
        if out is None:
            return result, valid
        out.copy_(result)
        (mask if mask is not None else valid).copy_(valid)
        return out, mask if mask is not None else valid
    kind = input_kind(x)
    _check_kinds(kind, p)
    if x.shape[1] != p.channels:
        raise ValueError(f"input has {x.shape[1]} channels, params have {p.channels}")
    x = x.contiguous()
    shape = tuple(x.shape[:4])
    out = torch.empty(shape, dtype=p.out_dtype, device=x.device) if out is None else out
    mask = torch.empty(shape, dtype=torch.bool, device=x.device) if mask is None else mask
    if out.shape != shape or out.dtype != p.out_dtype or mask.shape != shape or mask.dtype != torch.bool:
        raise ValueError(f"out/mask must be {shape} {p.out_dtype}/bool")
    raw = torch.view_as_real(x) if x.is_complex() else x
    f = kernel_fields(p)
    ext.sar_norm(raw, kind, out, mask, p.channels, shape[2] * shape[3], f["kind"], f["lo"], f["hi"], f["scale"],
                 f["offset"], f["gain"], f["mode"], p.fill, p.nodata, *launch)
    return out, mask


def kernel_fields(p: NormParams) -> dict:
    """The per-channel launch arguments of the kernel (SarNormArgs in kernels/sar_norm.cuh)."""
    offset, scale = p.affine()
    return {"kind": [PRODUCT_CODES[prod] for prod in p.products], "lo": [c[0] for c in p.clip_db],
            "hi": [c[1] for c in p.clip_db], "scale": scale, "offset": offset, "gain": p.gains(),
            "mode": 0 if p.mode == "scale" else 1}


def normalise_batch(batch: dict, norm_cfg, device, dtype: torch.dtype) -> torch.Tensor:
    """A loader batch's raw chips -> normalised images on `device` (never on the CPU when the device is a GPU).
    Each chip is normalised by its own product kind, polarisations and gain (its metadata): a shard folder may
    mix scenes of several kinds that share a dtype (intensity and dB are both float32), so one batch may too."""
    chips = batch["chips"].to(device, non_blocking=True)
    groups: dict[tuple, list[int]] = {}
    for i, meta in enumerate(batch["meta"]):
        key = (meta["product"], tuple(meta["polarisations"]), meta.get("calibration_gain"))
        groups.setdefault(key, []).append(i)
    if len(groups) == 1:
        ((product, pols, gain),) = groups
        return sar_normalize(chips, params_from_config(norm_cfg, pols, product, gain))[0].to(dtype)
    out = torch.empty(tuple(chips.shape[:4]), dtype=dtype, device=chips.device)
    for (product, pols, gain), rows in groups.items():
        rows = torch.tensor(rows, device=chips.device)
        out[rows] = sar_normalize(chips[rows], params_from_config(norm_cfg, pols, product, gain))[0].to(dtype)
    return out

"""The invalid-pixel matrix of the SAR normalisation: every input kind x every special value, with the
validity each must get written out by hand (not computed by the code under test).

Used by the CPU tests (torch reference and the kernel's own code compiled for the host) and by bench/kernels.py
on a GPU (the launched kernel). Each case is one row of pixels: first the special values, each between two
ordinary pixels, then ordinary pixels up to a whole number of 16-byte vectors, so that the kernel's vector path
runs (`odd=True` adds one pixel to force its scalar path).

The rules (knowlip.ops.sar_norm's docstring says the same in words):
- intensity / amplitude: NaN, +-inf, nodata, zero and negative values are invalid;
- dB: NaN, +-inf and nodata are invalid; zero and negative dB are ordinary values;
- complex (complex64, float32 pairs): a NaN or inf in either part is invalid; nodata when both parts equal the
  nodata value; zero intensity (both parts 0) is invalid; negative parts are ordinary phase;
- int16 pairs: as complex, without NaN/inf (not representable);
- uint16 DN: nodata and zero are invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from knowlip.ops.sar_norm import NormParams

CLIP = ((-25.0, 0.0),)
ORDINARY = {"intensity": 0.05, "amplitude": 0.2, "db": -12.0, "complex": (0.3, -0.1), "int16": (120, -45),
            "dn": 900}
NODATA = {"intensity": 0.125, "amplitude": 0.125, "db": -33.0, "complex": 0.5, "int16": 7, "dn": 65535}
INF, NAN = math.inf, math.nan


@dataclass
class PixelCase:
    name: str  # e.g. "complex64/imag=inf"
    x: torch.Tensor  # (1, 1, 1, W) raw pixels of one input kind
    params: NormParams
    expected_valid: torch.Tensor  # (1, 1, 1, W) bool, from the rules above


def _scalar_specials(product: str) -> list[tuple[str, float, bool]]:
    """(label, value, valid) for a one-number-per-pixel float product."""
    db = product == "db"
    return [("nan", NAN, False), ("+inf", INF, False), ("-inf", -INF, False),
            ("nodata", NODATA[product], False), ("zero", 0.0, db), ("negative", -3.0, db)]


def _complex_specials(integer: bool) -> list[tuple[str, tuple, bool]]:
    """(label, (re, im), valid) for complex pixels."""
    ordinary = ORDINARY["int16" if integer else "complex"]
    nodata = NODATA["int16" if integer else "complex"]
    cases = [("both=nodata", (nodata, nodata), False), ("real=nodata", (nodata, ordinary[1]), True),
             ("zero", (0, 0), False), ("real=zero", (0, ordinary[1]), True), ("negative", (-3, -4), True)]
    if not integer:
        for part in ("real", "imag"):
            for label, value in (("nan", NAN), ("+inf", INF), ("-inf", -INF)):
                pair = (value, ordinary[1]) if part == "real" else (ordinary[0], value)
                cases.append((f"{part}={label}", pair, False))
    return cases


def _row(values: list, ordinary, per_vector: int, odd: bool) -> tuple[list, list[bool]]:
    """Each special between ordinary pixels, padded with ordinary pixels to whole vectors (+1 when odd)."""
    pixels, valid = [ordinary], [True]
    for value, ok in values:
        pixels += [value, ordinary]
        valid += [ok, True]
    while len(pixels) % per_vector:
        pixels.append(ordinary)
        valid.append(True)
    if odd:
        pixels.append(ordinary)
        valid.append(True)
    return pixels, valid


def _case(name: str, pixels: list, valid: list[bool], dtype: torch.dtype, params: NormParams) -> PixelCase:
    x = torch.tensor(pixels, dtype=dtype)
    x = x.view(1, 1, 1, *x.shape)
    return PixelCase(name, x, params, torch.tensor(valid).view(1, 1, 1, -1))


def invalid_pixel_matrix(odd: bool = False, out_dtype: torch.dtype = torch.float32) -> list[PixelCase]:
    """One case per input kind x special value (NaN / inf / nodata / zero / negative where representable)."""
    p = lambda product, **kw: NormParams((product,), CLIP, fill=-1.0, out_dtype=out_dtype, **kw)
    cases = []
    for product in ("intensity", "amplitude", "db"):
        for label, value, ok in _scalar_specials(product):
            pixels, valid = _row([(value, ok)], ORDINARY[product], 4, odd)
            cases.append(_case(f"float32_{product}/{label}", pixels, valid, torch.float32,
                               p(product, nodata=NODATA[product])))
    for label, pair, ok in _complex_specials(integer=False):
        pixels, valid = _row([(pair, ok)], ORDINARY["complex"], 4, odd)
        pairs = _case("", pixels, valid, torch.float32, p("complex", nodata=NODATA["complex"]))
        cases.append(PixelCase(f"float32_pairs/{label}", pairs.x, pairs.params, pairs.expected_valid))
        cases.append(PixelCase(f"complex64/{label}", torch.view_as_complex(pairs.x.contiguous()), pairs.params,
                               pairs.expected_valid))
    for label, pair, ok in _complex_specials(integer=True):
        pixels, valid = _row([(pair, ok)], ORDINARY["int16"], 4, odd)
        cases.append(_case(f"int16_pairs/{label}", pixels, valid, torch.int16, p("complex", nodata=NODATA["int16"])))
    for label, value, ok in (("nodata", NODATA["dn"], False), ("zero", 0, False), ("max_not_nodata", 65534, True)):
        pixels, valid = _row([(value, ok)], ORDINARY["dn"], 8, odd)
        x = torch.tensor(pixels, dtype=torch.int32).to(torch.uint16).view(1, 1, 1, -1)
        cases.append(PixelCase(f"uint16_dn/{label}", x, p("dn", nodata=NODATA["dn"], gain=(1e-6,)),
                               torch.tensor(valid).view(1, 1, 1, -1)))
    return cases

"""The CUDA source's own per-element code, compiled by nvcc for the host and run on the CPU (through
tests/kernel_host_harness.cu), against the torch reference: every input layout, both output dtypes, the
vector and the scalar path. What this cannot check without a GPU is the launch (grid-stride loop, streams)."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from knowlip.ops.sar_norm import MAX_CHANNELS, NormParams, input_kind, kernel_fields, reference

NVCC = shutil.which("nvcc")
pytestmark = [pytest.mark.nvcc, pytest.mark.skipif(NVCC is None, reason="nvcc not found")]
HERE = Path(__file__).resolve().parent
VV, VH = (-25.0, 0.0), (-32.5, 0.0)


class SarNormArgs(ctypes.Structure):  # kernels/sar_norm.cuh
    _fields_ = [("n", ctypes.c_longlong), ("hw", ctypes.c_longlong), ("channels", ctypes.c_int),
                ("mode", ctypes.c_int), ("fill", ctypes.c_float), ("nodata", ctypes.c_float),
                ("has_nodata", ctypes.c_int), ("kind", ctypes.c_int * MAX_CHANNELS),
                ("lo", ctypes.c_float * MAX_CHANNELS), ("hi", ctypes.c_float * MAX_CHANNELS),
                ("scale", ctypes.c_float * MAX_CHANNELS), ("offset", ctypes.c_float * MAX_CHANNELS),
                ("gain", ctypes.c_float * MAX_CHANNELS)]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("harness") / "harness"
    subprocess.run([NVCC, "-gencode", "arch=compute_90,code=sm_90", "-O2", "-o", str(exe),
                    str(HERE / "kernel_host_harness.cu")], check=True, capture_output=True, timeout=300)
    return exe


def run_kernel_code(harness, tmp: Path, x: torch.Tensor, p: NormParams, force_scalar=False):
    shape = tuple(x.shape[:4])
    n, hw = int(np.prod(shape)), shape[2] * shape[3]
    f = kernel_fields(p)
    args = SarNormArgs(n=n, hw=hw, channels=p.channels, mode=f["mode"], fill=p.fill,
                       nodata=p.nodata if p.nodata is not None else 0.0, has_nodata=p.nodata is not None)
    for c in range(p.channels):
        for key in ("kind", "lo", "hi", "scale", "offset", "gain"):
            getattr(args, key)[c] = f[key][c]
    (tmp / "args.bin").write_bytes(bytes(args))
    raw = torch.view_as_real(x) if x.is_complex() else x
    (tmp / "in.bin").write_bytes(raw.contiguous().numpy().tobytes())
    bf16 = p.out_dtype == torch.bfloat16
    proc = subprocess.run([str(harness), str(tmp / "args.bin"), str(input_kind(x)), str(int(bf16)),
                           str(int(force_scalar)), str(tmp / "in.bin"), str(tmp / "out.bin"), str(tmp / "mask.bin")],
                          capture_output=True, text=True, check=True)
    out_raw = np.fromfile(tmp / "out.bin", dtype=np.uint16 if bf16 else np.float32)
    out = torch.from_numpy(out_raw.view(np.int16).copy()).view(torch.bfloat16) if bf16 else torch.from_numpy(out_raw)
    mask_bytes = np.fromfile(tmp / "mask.bin", dtype=np.uint8)
    assert mask_bytes.max(initial=0) <= 1, "an element no thread wrote (the harness poisons the mask with 2)"
    mask = torch.from_numpy(mask_bytes.astype(bool))
    return out.view(shape), mask.view(shape), proc.stdout.strip()


def inputs(shape):
    g = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    intensity = torch.rand(b, c, h, w, generator=g) * 0.5
    flat = intensity.view(-1)
    flat[::7], flat[::11], flat[::13], flat[::17] = 0.0, float("nan"), -1.0, float("inf")
    db = torch.rand(b, c, h, w, generator=g) * 40 - 35
    db.view(-1)[::5] = -99.0
    z = torch.complex(torch.rand(b, c, h, w, generator=g) - 0.5, torch.rand(b, c, h, w, generator=g) - 0.5)
    z.view(-1)[::9] = 0
    pairs = ((torch.rand(b, c, h, w, 2, generator=g) - 0.5) * 2000).to(torch.int16)
    dn = (torch.rand(b, c, h, w, generator=g) * 65535).to(torch.int32).to(torch.uint16)
    dn.view(-1)[::6] = 0
    clip = (VV, VH)[:c]
    kinds = lambda k: (k,) * c
    return [
        ("intensity", intensity, NormParams(kinds("intensity"), clip)),
        ("amplitude+db", torch.cat([intensity[:, :1], db[:, 1:]], 1),
         NormParams(("amplitude", "db")[:c], clip, nodata=-99.0, fill=-2.0)),
        ("complex64", z, NormParams(kinds("complex"), clip)),
        ("float_pairs", torch.view_as_real(z).contiguous(), NormParams(kinds("complex"), clip)),
        ("int16_pairs", pairs, NormParams(kinds("complex"), clip)),
        ("uint16_dn", dn, NormParams(kinds("dn"), clip, gain=(1e-6,) * c)),
        ("standardise", intensity, NormParams(kinds("intensity"), clip, mode="standardise", mean_db=(-12.0,) * c,
                                              std_db=(4.0,) * c)),
    ]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,path", [((2, 2, 8, 16), "vector"), ((1, 2, 5, 7), "scalar"),
                                        # planes of more than one tile (256 threads x 4 vectors), the last partial
                                        ((1, 2, 64, 80), "vector"), ((1, 2, 37, 53), "scalar")])
def test_kernel_code_matches_reference(harness, tmp_path, shape, path, out_dtype):
    for name, x, p in inputs(shape):
        p = NormParams(p.products, p.clip_db, p.mode, p.mean_db, p.std_db, p.gain, p.nodata, p.fill, out_dtype)
        out, mask, used = run_kernel_code(harness, tmp_path, x, p)
        ref, ref_mask = reference(x, p)
        assert used == path, name
        assert torch.equal(mask, ref_mask), name
        assert torch.isfinite(out.float()).all(), name
        if out_dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=name)
        else:  # both round the same float32 value to bf16; log10f may differ by an ulp before rounding
            assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7 + 1e-6).all(), name


def test_forced_scalar_path_agrees_with_vector_path(harness, tmp_path):
    name, x, p = inputs((2, 2, 8, 16))[0]
    vec = run_kernel_code(harness, tmp_path, x, p)
    sca = run_kernel_code(harness, tmp_path, x, p, force_scalar=True)
    assert vec[2] == "vector" and sca[2] == "scalar"
    assert torch.equal(vec[0], sca[0]) and torch.equal(vec[1], sca[1])


@pytest.mark.parametrize("odd", [False, True])
def test_invalid_pixel_matrix_on_the_kernel_code(harness, tmp_path, odd):
    """The invalid-pixel matrix (every input kind x NaN / inf / nodata / zero / negative) through the kernel's
    own per-vector code: the mask the rules give, and the same values as the reference."""
    from knowlip.ops.sar_cases import invalid_pixel_matrix

    for case in invalid_pixel_matrix(odd=odd):
        out, mask, used = run_kernel_code(harness, tmp_path, case.x, case.params)
        assert used == ("scalar" if odd else "vector"), case.name
        assert torch.equal(mask, case.expected_valid), case.name
        ref, _ = reference(case.x, case.params)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=case.name)

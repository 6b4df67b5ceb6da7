"""The CUDA source compiles for sm_90 with no register spills and with 128-bit vector loads (needs nvcc)."""

import re
import shutil
import subprocess

import pytest

from knowlip.ops.sar_norm import kernel_sources

NVCC = shutil.which("nvcc")
pytestmark = [pytest.mark.nvcc, pytest.mark.skipif(NVCC is None, reason="nvcc not found")]


def test_cu_compiles_for_sm90_without_spills(tmp_path):
    cu = kernel_sources()[0]
    proc = subprocess.run([NVCC, "-gencode", "arch=compute_90,code=sm_90", "-O3", "-Xptxas", "-v", "-c", str(cu),
                           "-o", str(tmp_path / "sar_norm.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = proc.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    # 4 input kinds x 2 outputs x (vector, scalar), plus float input's tuning depths (unroll 1, 4, 8) x 2 outputs
    assert len(kernels) == 16 + 6, f"unexpected kernel instances: {kernels}"
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)]
    assert len(spills) == len(kernels) and all(s == (0, 0) for s in spills), report
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert max(registers) <= 64, f"register use grew: {registers}"


def test_ptx_uses_16_byte_loads(tmp_path):
    ptx = tmp_path / "sar_norm.ptx"
    subprocess.run([NVCC, "-gencode", "arch=compute_90,code=compute_90", "-O3", "--ptx", str(kernel_sources()[0]),
                    "-o", str(ptx)], check=True, capture_output=True)
    text = ptx.read_text()
    assert text.count("ld.global.nc.v4.f32") >= 4  # float x4 and complex float2 x2, for both output dtypes
    assert text.count("ld.global.nc.v4.u32") >= 4  # uint16 x8 and int16 pairs x4


def test_cu_compiles_with_the_flags_torch_extensions_add(tmp_path):
    """torch.utils.cpp_extension builds .cu files with these macros; bf16 code must not need what they remove."""
    flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    proc = subprocess.run([NVCC, "-gencode", "arch=compute_90,code=sm_90", "-O3", *flags, "-c",
                           str(kernel_sources()[0]), "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

"""Fused SAR normalisation kernel: correctness against the CPU reference, then timing on the GPU.

One script for a GPU session (H100/H200):
  1. correctness: the invalid-pixel matrix (knowlip.ops.sar_cases: every input kind x NaN / inf / nodata /
     zero / negative, vector and scalar path), every input kind (float32 intensity/amplitude/dB, complex64, int16 pairs, float32 pairs,
     uint16 DN), float32 and bf16 outputs, odd sizes (scalar path) and aligned sizes (vector path), and the
     real Sentinel-1 scenes; outputs are poisoned with NaN first so unwritten elements show;
  2. timing with CUDA events: the kernel vs (a) the same pipeline in eager torch on the GPU and (b) a
     device-to-device copy of the same input bytes, for inputs of 16, 64 and 256 MB.
Targets: >= 85% of the copy's bandwidth for inputs >= 64 MB, and >= 3x faster than eager torch.
Prints one JSON line per check/timing and a summary. `--device cpu` runs the same code on the reference only
(a smoke test of the script itself; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import JsonLines, Timer  # noqa: E402
from knowlip.ops.sar_cases import invalid_pixel_matrix  # noqa: E402
from knowlip.ops.sar_norm import NormParams, kernel_available, reference, sar_normalize  # noqa: E402

emit = JsonLines()  # --out sets its file

VV, VH = (-25.0, 0.0), (-32.5, 0.0)


def random_inputs(shape, device, gen):
    b, c, h, w = shape
    g = lambda *s: torch.rand(*s, generator=gen).to(device)
    intensity = g(b, c, h, w) * 0.5
    intensity.view(-1)[::97] = 0.0
    intensity.view(-1)[::101] = float("nan")
    intensity.view(-1)[::103] = -1.0
    intensity.view(-1)[::107] = float("inf")
    db = (g(b, c, h, w) * 40 - 35)
    db.view(-1)[::89] = -99.0
    re, im = g(b, c, h, w) - 0.5, g(b, c, h, w) - 0.5
    cplx = torch.complex(re, im)
    pairs16 = ((torch.rand(b, c, h, w, 2, generator=gen) - 0.5) * 2000).to(torch.int16).to(device)
    dn = (torch.rand(b, c, h, w, generator=gen) * 65535).to(torch.int32).to(torch.uint16).to(device)
    prods = lambda k: (k,) * c
    clip = (VV, VH)[:c] if c <= 2 else (VV,) * c
    return [
        ("float32_intensity", intensity, NormParams(prods("intensity"), clip, nodata=None)),
        ("float32_amplitude", intensity, NormParams(prods("amplitude"), clip)),
        ("float32_db_nodata", db, NormParams(prods("db"), clip, nodata=-99.0, fill=-1.0)),
        ("complex64", cplx, NormParams(prods("complex"), clip)),
        ("float32_pairs", torch.view_as_real(cplx).contiguous(), NormParams(prods("complex"), clip)),
        ("int16_pairs", pairs16, NormParams(prods("complex"), clip)),
        ("uint16_dn", dn, NormParams(prods("dn"), clip, gain=(1e-6,) * c)),
        ("float32_standardise", intensity, NormParams(prods("intensity"), clip, mode="standardise",
                                                      mean_db=(-12.0,) * c, std_db=(4.0,) * c)),
    ]


def check(name, x, p, out_dtype, results):
    p = NormParams(p.products, p.clip_db, p.mode, p.mean_db, p.std_db, p.gain, p.nodata, p.fill, out_dtype)
    shape = tuple(x.shape[:4])
    out = torch.full(shape, float("nan"), dtype=out_dtype, device=x.device)  # poison
    mask = torch.ones(shape, dtype=torch.bool, device=x.device)
    sar_normalize(x, p, out=out, mask=mask)
    ref, ref_valid = reference(x.cpu(), p)
    got = out.cpu()
    ok_mask = bool(torch.equal(mask.cpu(), ref_valid))
    ok_nan = bool(torch.isfinite(got.float()).all())
    if out_dtype == torch.float32:
        err = ((got - ref).abs() / ref.abs().clamp_min(1e-6)).max().item()
        ok_val = bool(torch.allclose(got, ref, rtol=1e-6, atol=1e-6))
    else:  # bf16: within one bf16 rounding of the float32 reference
        ref32, _ = reference(x.cpu(), NormParams(p.products, p.clip_db, p.mode, p.mean_db, p.std_db, p.gain,
                                                 p.nodata, p.fill, torch.float32))
        err = (got.float() - ref32).abs().max().item()
        ok_val = bool(((got.float() - ref32).abs() <= ref32.abs() * 2**-8 + 1e-6).all())
    ok = ok_mask and ok_nan and ok_val
    results.append(ok)
    emit({"check": name, "shape": list(x.shape), "out": str(out_dtype).split(".")[-1], "ok": ok,
          "mask_equal": ok_mask, "no_nan": ok_nan, "max_err": err})


def check_invalid_pixels(device, results) -> None:
    """The invalid-pixel matrix on the launched kernel: its mask must be the hand-written one."""
    failed = []
    for odd in (False, True):
        for out_dtype in (torch.float32, torch.bfloat16):
            for case in invalid_pixel_matrix(odd=odd, out_dtype=out_dtype):
                x = case.x.to(device)
                out = torch.full(x.shape[:4], float("nan"), dtype=out_dtype, device=device)
                mask = torch.ones(x.shape[:4], dtype=torch.bool, device=device)
                sar_normalize(x, case.params, out=out, mask=mask)
                ref, _ = reference(case.x, case.params)
                tol = 1e-6 if out_dtype == torch.float32 else 2**-7  # log10f may differ from torch's by an ulp
                ok = torch.equal(mask.cpu(), case.expected_valid) and torch.allclose(
                    out.cpu().float(), ref.float(), rtol=tol, atol=1e-6)
                results.append(ok)
                if not ok:
                    failed.append(f"{case.name}{'/odd' if odd else ''}/{str(out_dtype).split('.')[-1]}")
    emit({"check": "invalid_pixel_matrix", "ok": not failed, "failed": failed})


SCENES_NPY = Path(__file__).resolve().parent / "sentinel1_db.npy"  # made by --export-scenes, not committed


def read_real_scenes_db() -> np.ndarray | None:
    """(2, 1, 216, 264) dB values of the real Sentinel-1 scenes: from the GeoTIFFs when rasterio is here,
    else from the .npy that `--export-scenes` wrote (the GPU machines have no rasterio: carry that file)."""
    try:
        import rasterio
    except ImportError:
        return np.load(SCENES_NPY) if SCENES_NPY.is_file() else None
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentinel1"
    arrays = []
    for tif in sorted(root.glob("*.tif")):
        with rasterio.open(tif) as src:
            arrays.append(src.read(1)[:216, :264])
    return np.stack(arrays)[:, None] if arrays else None


def real_scene_inputs(device):
    db_np = read_real_scenes_db()
    if db_np is None:
        emit({"check": "real_scenes", "skipped": f"no rasterio and no {SCENES_NPY.name}; run "
                          "`python bench/kernels.py --export-scenes` where rasterio is installed"})
        return []
    db = torch.from_numpy(np.ascontiguousarray(db_np))
    intensity = torch.where(db == -99.0, torch.zeros_like(db), 10.0 ** (db.double() / 10.0)).float()
    return [("sentinel1_db", db.to(device), NormParams(("db",), (VV,), nodata=-99.0)),
            ("sentinel1_intensity", intensity.to(device), NormParams(("intensity",), (VV,)))]


def timings(device, sizes_mb, out_dtype):
    timer = Timer(device)
    rows = []
    for mb in sizes_mb:
        x, p = big_input(mb, device)
        p = NormParams(p.products, p.clip_db, out_dtype=out_dtype)
        out = torch.empty(x.shape, dtype=out_dtype, device=device)
        mask = torch.empty(x.shape, dtype=torch.bool, device=device)
        dst = torch.empty_like(x)
        t_kernel = timer(lambda: sar_normalize(x, p, out=out, mask=mask), back_to_back=BACK_TO_BACK)
        t_single = timer(lambda: sar_normalize(x, p, out=out, mask=mask))
        t_eager = timer(lambda: reference(x, p), repeats=5)
        t_copy = timer(lambda: dst.copy_(x), back_to_back=BACK_TO_BACK)
        in_bytes = x.numel() * 4
        moved = in_bytes + out.numel() * out.element_size() + mask.numel()
        kernel_bw, copy_bw = moved / t_kernel / 1e6, 2 * in_bytes / t_copy / 1e6  # GB/s
        row = {"timing": f"{mb}MB", "out": str(out_dtype).split(".")[-1], "kernel_ms": round(t_kernel, 4),
               "kernel_ms_single_call": round(t_single, 4),
               "eager_ms": round(t_eager, 4), "copy_ms": round(t_copy, 4), "kernel_GBps": round(kernel_bw, 1),
               "copy_GBps": round(copy_bw, 1), "bw_vs_copy": round(kernel_bw / copy_bw, 3),
               "speedup_vs_eager": round(t_eager / t_kernel, 2)}
        rows.append(row)
        emit(row)
    return rows


BACK_TO_BACK = 10  # kernel and copy timed over 10 queued calls (bench_io.Timer); single calls reported beside


def big_input(mb: int, device):
    """float32 intensity of `mb` MB as (B, 2, 512, 512), with its params."""
    side = 512
    n = mb * 2**20 // 4
    x = torch.rand(max(1, n // (2 * side * side)), 2, side, side, device=device) + 1e-3
    return x, NormParams(("intensity", "intensity"), (VV, VH))


def tune(device, sizes_mb) -> list[dict]:
    """Every unroll depth x grid size the kernel offers for float input: bandwidth against the copy, timed
    alternately on the same buffers, and each output checked equal to the default launch's."""
    timer = Timer(device)
    rows = []
    for mb in sizes_mb:
        x, p = big_input(mb, device)
        dst = torch.empty_like(x)
        for out_dtype in (torch.float32, torch.bfloat16):
            p = NormParams(p.products, p.clip_db, out_dtype=out_dtype)
            ref, ref_mask = sar_normalize(x, p)
            out, mask = torch.empty_like(ref), torch.empty_like(ref_mask)
            moved = x.numel() * 4 + out.numel() * out.element_size() + mask.numel()
            for unroll in (1, 2, 4, 8):
                for blocks_per_sm in (0, 8):  # one block per tile (the default) | 8 per SM, looping over the tiles
                    launch = (unroll, blocks_per_sm)
                    t = timer(lambda: sar_normalize(x, p, out=out, mask=mask, launch=launch), back_to_back=BACK_TO_BACK)
                    t_copy = timer(lambda: dst.copy_(x), back_to_back=BACK_TO_BACK)
                    same = bool(torch.equal(out, ref) and torch.equal(mask, ref_mask))
                    row = {"tune": f"{mb}MB", "out": str(out_dtype).split(".")[-1], "unroll": unroll,
                           "grid": "tiles" if blocks_per_sm == 0 else "8/SM", "kernel_ms": round(t, 4),
                           "bw_vs_copy": round(moved / t / (2 * x.numel() * 4 / t_copy), 3), "same_output": same}
                    rows.append(row)
                    emit(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--export-scenes", action="store_true",
                        help=f"write the real scenes to {SCENES_NPY.name} (for machines without rasterio) and exit")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--tune", action="store_true", help="also time every unroll depth x grid size (float input)")
    args = parser.parse_args()
    emit.out = args.out
    if args.export_scenes:
        scenes = read_real_scenes_db()
        if scenes is None:
            print("no scenes found (needs rasterio and ../shared/data/sentinel1)")
            return 1
        np.save(SCENES_NPY, scenes)
        print(f"wrote {SCENES_NPY} {scenes.shape} {scenes.dtype}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine (or --device cpu for a smoke test)")
        return 0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (reference only)"
    emit({"device": name, "torch": torch.__version__, "kernel": kernel_available()})
    if device.type == "cuda" and not kernel_available():
        print("the fused kernel did not build: see the warning above")
        return 1
    gen = torch.Generator().manual_seed(0)
    results: list[bool] = []
    check_invalid_pixels(device, results)
    for shape in [(2, 2, 64, 64), (3, 1, 37, 53)]:  # vector path, and scalar path (H*W odd)
        for label, x, p in random_inputs(shape, device, gen):
            for out_dtype in (torch.float32, torch.bfloat16):
                check(f"{label}{shape}", x, p, out_dtype, results)
    for label, x, p in real_scene_inputs(device):
        for out_dtype in (torch.float32, torch.bfloat16):
            check(label, x, p, out_dtype, results)
    rows = timings(device, args.sizes_mb, torch.float32) + timings(device, args.sizes_mb, torch.bfloat16)
    tuned = tune(device, [mb for mb in args.sizes_mb if mb >= 64]) if args.tune and device.type == "cuda" else []
    results += [r["same_output"] for r in tuned]
    big = [r for r in rows if int(r["timing"][:-2]) >= 64]
    summary = {"device": name, "checks_passed": sum(results), "checks": len(results),
               "min_bw_vs_copy_ge64MB": min((r["bw_vs_copy"] for r in big), default=None),
               "min_speedup_vs_eager": min(r["speedup_vs_eager"] for r in rows)}
    if tuned:
        best = max(tuned, key=lambda r: r["bw_vs_copy"])
        summary["best_tuned"] = {k: best[k] for k in ("tune", "out", "unroll", "grid", "bw_vs_copy")}
    emit({"summary": summary})
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

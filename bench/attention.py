"""Attention backends at the model's shapes: forward + backward time and agreement with the reference.

    python bench/attention.py [--out FILE]          # GPU: bf16, SDPA flash / cuDNN / efficient / math,
                                                    #      flash_attn when installed, knowlip's auto choice
    python bench/attention.py --device cpu          # CPU smoke test at small shapes (timings mean nothing)

Shapes: ViT-B/16 self-attention at 224 px (197 tokens) and 512 px (1,025 tokens), BERT-base text self-attention
with padding (128 tokens, lengths 24..128), and the causal decoder with padding. Every backend runs through
knowlip.model.attention.attention (the code the model calls), an SDPA backend forced with sdpa_kernel. The
check: output and the q/k/v gradients against the float32 reference (explicit softmax), as
||x - ref|| / ||ref||; bf16 lands between 1e-3 and 1e-2, and 2e-2 is the bound. A backend that cannot run a
shape (flash with a padding mask, say) is reported as unsupported, not as a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import JsonLines, Timer  # noqa: E402
from knowlip.model.attention import attention, reference_attention, resolve_backend  # noqa: E402

TOLERANCE = 2e-2
# name, batch, heads, length, head dim, padded keys, causal
GPU_SHAPES = [("vit_b16_224", 64, 12, 197, 64, False, False), ("vit_b16_512", 16, 12, 1025, 64, False, False),
              ("bert_padded_128", 64, 12, 128, 64, True, False), ("decoder_causal_padded_128", 64, 12, 128, 64,
                                                                  True, True)]
CPU_SHAPES = [("vit_small", 2, 2, 17, 16, False, False), ("text_padded", 2, 2, 12, 16, True, False),
              ("decoder_causal_padded", 2, 2, 12, 16, True, True)]


def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}


def make_inputs(b, h, n, d, padded, device, dtype, gen):
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    mask = None
    if padded:
        lengths = torch.randint(max(1, n // 5), n + 1, (b,), generator=gen)
        lengths[0] = n
        mask = (torch.arange(n)[None, :] < lengths[:, None]).to(device)
    return q, k, v, mask


def run_backend(name: str, q, k, v, mask, causal, grad):
    """A callable doing forward + backward through knowlip's attention with this backend forced."""

    def fwd():
        if name in ("flash_attn", "auto", "reference"):
            return attention(q, k, v, mask, causal, backend=name)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([sdpa_backends()[name]]):
            return attention(q, k, v, mask, causal, backend="sdpa")

    def step():
        q.grad = k.grad = v.grad = None
        out = fwd()
        out.backward(grad)
        return out

    return step


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def attention_flops(b, h, n, d, causal) -> float:
    """Forward + backward matmul FLOPs (backward = 2.5 x forward, as the flash-attention papers count)."""
    forward = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    return 3.5 * forward


def bench_shape(shape, backends, device, dtype, repeats, gen, emit) -> list[dict]:
    label, b, h, n, d, padded, causal = shape
    q, k, v, mask = make_inputs(b, h, n, d, padded, device, dtype, gen)
    grad = torch.randn(q.shape, generator=gen).to(device, dtype)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out = reference_attention(q32, k32, v32, mask, causal)
    ref_out.backward(grad.float())
    refs = {"out": ref_out.detach(), "dq": q32.grad, "dk": k32.grad, "dv": v32.grad}
    rows = []
    for name in backends:
        row = {"bench": "attention", "shape": label, "backend": name, "batch": b, "heads": h, "tokens": n,
               "head_dim": d, "padded": padded, "causal": causal, "dtype": str(dtype).split(".")[-1]}
        step = run_backend(name, q, k, v, mask, causal, grad)
        try:
            out = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except (RuntimeError, ValueError) as exc:
            row.update(supported=False, reason=str(exc).splitlines()[0][:160])
            rows.append(row)
            emit(row)
            continue
        errors = {"out": relative_error(out, refs["out"]), "dq": relative_error(q.grad, refs["dq"]),
                  "dk": relative_error(k.grad, refs["dk"]), "dv": relative_error(v.grad, refs["dv"])}
        ms = Timer(device)(step, repeats=repeats)
        row.update(supported=True, ms=round(ms, 4), tflops=round(attention_flops(b, h, n, d, causal) / ms / 1e9, 1),
                   max_rel_err=round(max(errors.values()), 5), agrees=max(errors.values()) <= TOLERANCE)
        rows.append(row)
        emit(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU: bench/attention.py times CUDA kernels; run it on a GPU machine (or --device cpu for a "
              "smoke test)")
        return 0

    emit = JsonLines(args.out)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    backends = list(sdpa_backends()) if gpu else ["sdpa_math"]
    probe = torch.empty(1, device=device, dtype=dtype)
    try:
        if resolve_backend("flash_attn", probe) == "flash_attn":
            backends.append("flash_attn")
    except RuntimeError:
        emit({"bench": "attention", "backend": "flash_attn", "supported": False, "reason": "not installed"})
    backends += ["auto", "reference"]
    emit({"bench": "attention", "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
          "auto_resolves_to": resolve_backend("auto", probe)})
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in (GPU_SHAPES if gpu else CPU_SHAPES):
        rows += bench_shape(shape, backends, device, dtype, args.repeats if gpu else 2, gen, emit)
    ran = [r for r in rows if r["supported"]]
    bad = [f"{r['shape']}/{r['backend']}" for r in ran if not r["agrees"]]
    emit({"summary": "attention", "ran": len(ran), "unsupported": len(rows) - len(ran), "disagree": bad})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""One attention function, several backends.

`attention(q, k, v, key_padding_mask, causal, backend)` with q, k, v of shape (B, H, L, D):
- "flash_attn": flash-attn kernels (CUDA, fp16/bf16); varlen for padded self-attention;
- "sdpa": torch's scaled_dot_product_attention (flash / cuDNN / memory-efficient on CUDA, math on CPU);
- "reference": explicit softmax(QK^T / sqrt(D)) V in float32, the oracle;
- "auto": flash_attn when importable and usable for these tensors, else sdpa.
`key_padding_mask` is (B, Lk) bool, True where a key may be attended.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from functools import lru_cache

import torch
import torch.utils.checkpoint
import torch.nn.functional as F

from knowlip.choices import ATTENTION_BACKENDS

log = logging.getLogger(__name__)
BACKENDS = ATTENTION_BACKENDS


@lru_cache(maxsize=1)
def _flash_attn():
    try:
        import flash_attn

        return flash_attn
    except Exception:
        return None


def resolve_backend(requested: str, q: torch.Tensor) -> str:
    """The backend that will actually run for these tensors."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    flash_ok = _flash_attn() is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if requested == "flash_attn" and not flash_ok:
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package, a CUDA device and "
                           "fp16/bf16 tensors; use 'auto' to fall back to torch SDPA")
    if requested == "auto":
        return "flash_attn" if flash_ok else "sdpa"
    return requested


class AttentionStats:
    """Counts which backend ran (for the log), owned by the model rather than global."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self._announced: set[str] = set()

    def record(self, backend: str) -> None:
        self.calls[backend] += 1
        if backend not in self._announced:
            self._announced.add(backend)
            log.info("attention backend in use: %s", backend)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              causal: bool = False, backend: str = "auto", stats: AttentionStats | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """dropout_p: on the attention probabilities (pass 0 in eval)."""
    chosen = resolve_backend(backend, q)
    if stats is not None and not torch.compiler.is_compiling():  # bookkeeping would break the compiled graph
        stats.record(chosen)
    if chosen == "reference":
        return reference_attention(q, k, v, key_padding_mask, causal, dropout_p)
    if chosen == "flash_attn":
        return _flash(q, k, v, key_padding_mask, causal, dropout_p)
    return _sdpa(q, k, v, key_padding_mask, causal, dropout_p)


def _causal_keep(lq: int, lk: int, device) -> torch.Tensor:
    """(Lq, Lk) True where query i may see key j (aligned at the end, as for a decoder)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def reference_attention(q, k, v, key_padding_mask=None, causal=False, dropout_p: float = 0.0) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    keep = _keep_mask(q, k, key_padding_mask, causal)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)


def _keep_mask(q, k, key_padding_mask, causal) -> torch.Tensor | None:
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].bool()
    if causal:
        c = _causal_keep(q.shape[-2], k.shape[-2], q.device)[None, None]
        keep = c if keep is None else keep & c
    return keep


def _sdpa(q, k, v, key_padding_mask, causal, dropout_p: float = 0.0) -> torch.Tensor:
    if key_padding_mask is None and (not causal or q.shape[-2] == k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_keep_mask(q, k, key_padding_mask, causal),
                                          dropout_p=dropout_p)


def _flash(q, k, v, key_padding_mask, causal, dropout_p: float = 0.0) -> torch.Tensor:
    fa = _flash_attn()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, L, H, D)
    if key_padding_mask is None:
        return fa.flash_attn_func(qt, kt, vt, dropout_p=dropout_p, causal=causal).transpose(1, 2)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("flash_attn varlen path supports padded self-attention only")
    b, lq, h, d = qt.shape
    mask = key_padding_mask.bool()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    idx = mask.flatten().nonzero(as_tuple=False).flatten()
    unpad = lambda t: t.reshape(b * lq, h, d).index_select(0, idx)
    out = fa.flash_attn_varlen_func(unpad(qt), unpad(kt), unpad(vt), cu, cu, int(lengths.max()), int(lengths.max()),
                                    dropout_p=dropout_p, causal=causal)
    full = torch.zeros(b * lq, h, d, dtype=out.dtype, device=out.device).index_copy(0, idx, out)
    return full.view(b, lq, h, d).transpose(1, 2)


def run_block(block: torch.nn.Module, *args, checkpointed: bool = False):
    """Call a transformer block, optionally recomputing it in backward. The non-reentrant form: it is the one
    that works under ZeRO-3 for modules called several times per step (zero3-patterns.md)."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)

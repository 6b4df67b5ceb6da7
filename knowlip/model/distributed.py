"""The autograd-aware gathers the contrastive losses need (one process without a process group just works;
the process group itself and the plain collectives live in knowlip.distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from knowlip.distributed import rank_and_world as world


def _check_equal_sizes(x: torch.Tensor, group) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world(group)[1])]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(f"ranks hold different batch sizes {[int(s) for s in sizes]}: contrastive gathers need "
                           "equal per-rank batches (train with data.drop_last=true)")


def gather_with_grad(x: torch.Tensor, group=None, check_sizes: bool = False) -> torch.Tensor:
    """Concatenate every rank's x along dim 0; gradients flow back to each rank's own slice."""
    _, size = world(group)
    if size == 1:
        return x
    if check_sizes:
        _check_equal_sizes(x, group)
    return _GatherWithGrad.apply(x, group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor and keeps this rank's
    slice (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, size = world(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, group=None, check_sizes: bool = False) -> torch.Tensor:
    _, size = world(group)
    if size == 1:
        return x
    if check_sizes:
        _check_equal_sizes(x, group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)

"""ViT image encoder for C-channel SAR input (pre-norm blocks, class token, learned position embeddings)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from knowlip.model.attention import AttentionStats, attention, run_block
from knowlip.model.dims import VisionDims


def interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D), bicubic over the patch grid; the class token is kept."""
    cls, patches = pos[:, :1], pos[:, 1:]
    old = int(math.isqrt(patches.shape[1]))
    if old * old != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches are not a square grid")
    if old == grid:
        return pos
    p = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    p = F.interpolate(p.float(), size=(grid, grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, p.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


class VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str, stats: AttentionStats):
        super().__init__()
        self.heads, self.backend, self.stats = heads, backend, stats
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, backend=self.backend, stats=self.stats)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a residual branch for whole samples with probability `rate` (rescaled)."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= rate
    return x * keep.to(x.dtype) / (1 - rate)


class VitBlock(nn.Module):
    def __init__(self, dims: VisionDims, backend: str, stats: AttentionStats, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        hidden = int(dims.dim * dims.mlp_ratio)
        self.norm1 = nn.LayerNorm(dims.dim, eps=1e-6)
        self.attn = VitAttention(dims.dim, dims.heads, backend, stats)
        self.norm2 = nn.LayerNorm(dims.dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dims.dim, hidden), nn.Linear(hidden, dims.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))), self.drop_path_rate, self.training)


class VisionTransformer(nn.Module):
    def __init__(self, dims: VisionDims, in_channels: int, backend: str = "auto", stats: AttentionStats | None = None):
        super().__init__()
        if dims.image_size % dims.patch:
            raise ValueError(f"image size {dims.image_size} is not a multiple of the patch size {dims.patch}")
        self.dims, self.in_channels = dims, in_channels
        stats = stats or AttentionStats()
        grid = dims.image_size // dims.patch
        self.patch_embed = nn.Conv2d(in_channels, dims.dim, kernel_size=dims.patch, stride=dims.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dims.dim))
        rates = [dims.drop_path * i / max(1, dims.depth - 1) for i in range(dims.depth)]  # rising with depth
        self.blocks = nn.ModuleList(VitBlock(dims, backend, stats, rate) for rate in rates)
        self.norm = nn.LayerNorm(dims.dim, eps=1e-6)
        self.activation_checkpointing = False  # recompute blocks in backward (train.activation_checkpointing)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, 1 + patches, D) token embeddings."""
        if images.shape[1] != self.in_channels:
            raise ValueError(f"the image encoder takes {self.in_channels} channels, got {images.shape[1]}")
        h, w = images.shape[-2:]
        if h != w or h % self.dims.patch:
            raise ValueError(f"images must be square multiples of {self.dims.patch} px, got {h}x{w}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        pos = interpolate_pos_embed(self.pos_embed, h // self.dims.patch)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.activation_checkpointing)
        return self.norm(x)

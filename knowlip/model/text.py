"""BERT-style text model with three modes sharing one set of weights:

- "text": the unimodal encoder (bidirectional self-attention), for ITC;
- "multimodal": the image-grounded encoder (self-attention + cross-attention to image tokens), for ITM;
- "decoder": the causal decoder, which shares everything with the encoder except self-attention
  (its own `dec_self_attn`), conditioned on image tokens through the shared cross-attention, for captioning.

Layers are post-norm as in BERT, so BERT-family checkpoints map onto them (knowlip.model.pretrained).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from knowlip.model.attention import AttentionStats, attention, run_block
from knowlip.model.dims import TextDims

MODES = ("text", "multimodal", "decoder")


class BertAttention(nn.Module):
    """Multi-head attention + output projection + residual + LayerNorm (post-norm)."""

    def __init__(self, dim: int, heads: int, kv_dim: int, backend: str, stats: AttentionStats, dropout: float = 0.0):
        super().__init__()
        self.heads, self.backend, self.stats, self.attn_dropout = heads, backend, stats, dropout
        self.dropout = dropout  # functional, as every dropout here: a parameter-less module costs ZeRO-3 hooks
        self.query = nn.Linear(dim, dim)
        self.key, self.value = nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        kv = x if kv is None else kv
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
        ctx = attention(q, k, v, key_padding_mask, causal, self.backend, self.stats,
                        self.attn_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        return self.norm(x + F.dropout(self.out(ctx), self.dropout, self.training))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + F.dropout(self.down(F.gelu(self.up(x))), self.dropout, self.training))


class TextLayer(nn.Module):
    def __init__(self, dims: TextDims, image_dim: int, backend: str, stats: AttentionStats, with_fusion: bool):
        super().__init__()
        p = dims.dropout
        self.self_attn = BertAttention(dims.dim, dims.heads, dims.dim, backend, stats, p)
        self.ffn = FeedForward(dims.dim, dims.intermediate, p)
        # A momentum copy used only in "text" mode needs neither cross-attention nor decoder self-attention.
        self.cross_attn = BertAttention(dims.dim, dims.heads, image_dim, backend, stats, p) if with_fusion else None
        self.dec_self_attn = BertAttention(dims.dim, dims.heads, dims.dim, backend, stats, p) if with_fusion else None

    def forward(self, x, mask, mode: str, image_embeds=None) -> torch.Tensor:
        if mode == "decoder":
            x = self.dec_self_attn(x, key_padding_mask=mask, causal=True)
        else:
            x = self.self_attn(x, key_padding_mask=mask)
        if mode != "text":
            x = self.cross_attn(x, kv=image_embeds)
        return self.ffn(x)


class TextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, dims: TextDims):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dims.dim)
        self.position = nn.Embedding(dims.max_positions, dims.dim)
        self.token_type = nn.Embedding(1, dims.dim)  # kept so BERT checkpoints map; one segment only
        self.norm = nn.LayerNorm(dims.dim, eps=1e-12)
        self.dropout = dims.dropout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(pos)[None] + self.token_type.weight[0])
        return F.dropout(x, self.dropout, self.training)


class TextModel(nn.Module):
    def __init__(self, vocab_size: int, dims: TextDims, image_dim: int, backend: str = "auto",
                 stats: AttentionStats | None = None, with_fusion: bool = True):
        super().__init__()
        stats = stats or AttentionStats()
        self.dims, self.with_fusion = dims, with_fusion
        self.embeddings = TextEmbeddings(vocab_size, dims)
        self.layers = nn.ModuleList(TextLayer(dims, image_dim, backend, stats, with_fusion)
                                    for _ in range(dims.layers))
        if with_fusion:  # the decoder's language-model head; its output matrix is the word embeddings
            self.lm_transform = nn.Linear(dims.dim, dims.dim)
            self.lm_norm = nn.LayerNorm(dims.dim, eps=1e-12)
            self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.activation_checkpointing = False  # recompute layers in backward (train.activation_checkpointing)
        self.apply(_init_bert)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, mode: str = "text",
                image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if mode not in MODES:
            raise ValueError(f"unknown text mode {mode!r}")
        if mode != "text" and (image_embeds is None or not self.with_fusion):
            raise ValueError(f"mode {mode!r} needs image embeddings and a model with cross-attention")
        if ids.shape[1] > self.dims.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens exceed the {self.dims.max_positions} position embeddings")
        x = self.embeddings(ids)
        for layer in self.layers:
            x = run_block(layer, x, mask, mode, image_embeds, checkpointed=self.activation_checkpointing)
        return x

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.lm_norm(F.gelu(self.lm_transform(hidden)))
        return h @ self.embeddings.word.weight.t() + self.lm_bias


def _init_bert(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)

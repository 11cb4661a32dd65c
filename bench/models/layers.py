"""Building blocks shared by every backbone: multi-head attention with a pluggable core, pre-LN block."""
from __future__ import annotations

import torch
from torch import nn

from bench.method import AttentionSpec


class MultiHeadAttention(nn.Module):
    """Projections around a method-supplied core; the core sees (B, H, L, D) tensors only."""

    def __init__(self, d_model: int, n_heads: int, method, spec: AttentionSpec, dropout: float = 0.0, d_qkv: int | None = None):
        super().__init__()
        d_qkv = d_qkv or d_model
        if d_qkv % n_heads:
            raise ValueError(f"d_qkv={d_qkv} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_qkv // n_heads
        self.q = nn.Linear(d_model, d_qkv)
        self.k = nn.Linear(d_model, d_qkv)
        self.v = nn.Linear(d_model, d_qkv)
        self.out = nn.Linear(d_qkv, d_model)
        self.drop = nn.Dropout(dropout)
        self.core = method.attention(spec)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, memory: torch.Tensor | None = None):
        src = x if memory is None else memory
        q, k, v = self._heads(self.q(x)), self._heads(self.k(src)), self._heads(self.v(src))
        o = self.core(q, k, v, key_padding_mask)  # (B, H, L, D)
        B, H, L, D = o.shape
        return self.drop(self.out(o.transpose(1, 2).reshape(B, L, H * D)))


class PreLNBlock(nn.Module):
    """x + Drop(MHA(LN(x))); x + MLP(LN(x)) with MLP = Linear -> GELU -> Drop -> Linear -> Drop."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, method, spec: AttentionSpec, dropout: float, d_qkv: int | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, method, spec, dropout, d_qkv)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_padding_mask)
        return x + self.mlp(self.ln2(x))

"""GPT-style causal decoder (nanoGPT layout) whose attention cores come from a sparsebench method.

token + learned position embeddings -> dropout -> ``n_layers`` pre-LN blocks (``bench.models.layers.PreLNBlock``,
each with a causal ``AttentionSpec(causal=True, kind="decoder_self", stack="decoder")``) -> final LayerNorm ->
LM head tied to the token embedding (no bias). Initialisation as GPT-2/nanoGPT: N(0, 0.02) for weights, zero
biases, and the residual output projections (attention out, second MLP linear) scaled by 1/sqrt(2 * n_layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bench.method import AttentionSpec
from bench.models.layers import PreLNBlock


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 512
    max_len: int = 64  # context length (positions)
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 2
    d_ff: int = 256
    dropout: float = 0.0


class GPTDecoder(nn.Module):
    """``forward(tokens (B, L) int64, key_padding_mask=None) -> logits (B, L, vocab)``.

    Works with any ``DecoderConfig``-like object having the fields above."""

    def __init__(self, cfg, method):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.d_model // cfg.n_heads
        self.blocks = nn.ModuleList(
            PreLNBlock(
                cfg.d_model, cfg.n_heads, cfg.d_ff, method,
                AttentionSpec(layer=i, n_heads=cfg.n_heads, head_dim=head_dim, max_len=cfg.max_len,
                              causal=True, kind="decoder_self", stack="decoder"),
                cfg.dropout,
            )
            for i in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok.weight  # tied
        self.apply(self._init)
        for blk in self.blocks:
            for p in (blk.attn.out.weight, blk.mlp[3].weight):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L = tokens.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds the decoder's max_len={self.cfg.max_len}")
        pos = torch.arange(L, device=tokens.device)
        x = self.drop(self.tok(tokens) + self.pos(pos)[None])
        for blk in self.blocks:
            x = blk(x, key_padding_mask)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos.weight.numel() if non_embedding else n

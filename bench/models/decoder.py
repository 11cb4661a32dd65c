"""GPT-style causal decoder (nanoGPT layout) whose attention cores come from a sparsebench method.

token + learned position embeddings -> dropout -> ``n_layers`` pre-LN blocks (``bench.models.layers.PreLNBlock``,
each with a causal ``AttentionSpec(causal=True, kind="decoder_self", stack="decoder")``) -> final LayerNorm ->
LM head tied to the token embedding (no bias). Initialisation as GPT-2/nanoGPT: N(0, 0.02) for weights, zero
biases, and the residual output projections (attention out, second MLP linear) scaled by 1/sqrt(2 * n_layers).

Method hooks: attention cores and FFNs (``FFNSpec(stack="decoder")``) come from the method. The init above runs
after construction over the whole module tree, so it also initialises what a method's FFN holds; the residual
scaling hits the FFN's ``fc2`` (the default's when the method wrapped it; none when a replacement has no Linear
``fc2``). Poolers (``method.pooler(PoolerSpec(stack="decoder"))``) are asked for after every block, but a causal LM
predicts every position, so a pooler that shortens the sequence is a ``BenchError``; a length-preserving one runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bench.errors import BenchError
from bench.method import AttentionSpec, PoolerSpec
from bench.models.layers import PreLNBlock, apply_pooler, residual_fc2


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
        blocks, poolers = [], []
        for i in range(cfg.n_layers):
            blocks.append(PreLNBlock(
                cfg.d_model, cfg.n_heads, cfg.d_ff, method,
                AttentionSpec(layer=i, n_heads=cfg.n_heads, head_dim=head_dim, max_len=cfg.max_len,
                              causal=True, kind="decoder_self", stack="decoder"),
                cfg.dropout,
            ))
            pooler = method.pooler(PoolerSpec(layer=i, d_model=cfg.d_model, max_len=cfg.max_len, stack="decoder"))
            if pooler is not None and pooler.output_length(cfg.max_len) != cfg.max_len:
                raise BenchError(f"{getattr(method, 'name', type(method).__name__)}: a causal decoder cannot shorten "
                                 f"its sequence (pooler after decoder layer {i}: {cfg.max_len} -> "
                                 f"{pooler.output_length(cfg.max_len)} positions; the LM predicts every position)")
            poolers.append(pooler)
        self.blocks = nn.ModuleList(blocks)
        self.poolers = nn.ModuleList(p if p is not None else nn.Identity() for p in poolers)
        self._has_pooler = [p is not None for p in poolers]
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok.weight  # tied
        self.apply(self._init)
        for blk in self.blocks:
            fc2 = residual_fc2(blk)
            for p in (blk.attn.out.weight,) + (() if fc2 is None else (fc2.weight,)):
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
        for blk, pool, has in zip(self.blocks, self.poolers, self._has_pooler):
            x = blk(x, key_padding_mask)
            if has:
                x, key_padding_mask = apply_pooler(pool, x, key_padding_mask)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos.weight.numel() if non_embedding else n

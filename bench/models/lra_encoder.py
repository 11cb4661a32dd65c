"""LRA encoder classifier: token + learned position embeddings, pre-LN blocks, pooling, MLP head.

Two config lineages (``../shared/specs/benchmarks_and_baselines.md``): the original LRA release configs
(CLS pooling, wide models) and the Skyformer/Nystromformer/SPION family (2 layers, 64 dims, MEAN pooling
over all positions, padding included, after ``LN(x) * token_mask``). Retrieval runs two documents
through the shared encoder and classifies ``[x0, x1, x0*x1, x0-x1]``.

Method hooks: every block's attention core (``AttentionSpec``) and FFN (``FFNSpec``) come from the method; after
block ``i`` the method may put a pooler (``method.pooler(PoolerSpec(layer=i, ...))``) that runs as
``x, mask = pooler(x, mask)`` on the token mask (even when ``attention_padding_mask`` is off, the encoder tracks
it for the final ``LN(x) * mask`` pooling) and may shorten the sequence; later blocks are built for
``pooler.output_length(L)`` positions. With CLS pooling the pooler must keep position 0 (the CLS token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.attention import same_padding
from bench.method import AttentionSpec, PoolerSpec
from bench.models.layers import PreLNBlock, apply_pooler


@dataclass(frozen=True)
class LRAModelConfig:
    vocab_size: int = 32
    n_classes: int = 10
    max_len: int = 2048
    n_layers: int = 2
    d_model: int = 64
    d_qkv: int = 64
    n_heads: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    pooling: str = "mean"  # mean (Skyformer: over all L positions) | cls
    dual: bool = False  # Retrieval: two documents, shared encoder
    attention_padding_mask: bool = True  # Skyformer: yes for ListOps/Text/Retrieval, no for Image/Pathfinder


# Presets from the two lineages; tasks pick and shrink them per scale.
SKYFORMER_2L64 = LRAModelConfig()
LRA_ORIGINAL_LISTOPS = LRAModelConfig(n_layers=4, d_model=512, d_qkv=512, n_heads=8, d_ff=1024, pooling="cls")


class LRAEncoder(nn.Module):
    def __init__(self, cfg: LRAModelConfig, method):
        super().__init__()
        self.cfg = cfg
        extra = 1 if cfg.pooling == "cls" else 0
        self.tok = nn.Embedding(cfg.vocab_size + extra, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len + extra, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.d_qkv // cfg.n_heads
        blocks, poolers = [], []
        length = cfg.max_len + extra  # longest sequence the next block sees (shortened by poolers)
        for i in range(cfg.n_layers):
            blocks.append(PreLNBlock(
                cfg.d_model, cfg.n_heads, cfg.d_ff, method,
                AttentionSpec(layer=i, n_heads=cfg.n_heads, head_dim=head_dim, max_len=length),
                cfg.dropout, cfg.d_qkv,
            ))
            pooler = method.pooler(PoolerSpec(layer=i, d_model=cfg.d_model, max_len=length, stack="encoder"))
            poolers.append(pooler)
            if pooler is not None:
                length = pooler.output_length(length)
        self.blocks = nn.ModuleList(blocks)
        self.poolers = nn.ModuleList(p if p is not None else nn.Identity() for p in poolers)
        self._has_pooler = [p is not None for p in poolers]
        self.out_len = length  # longest sequence after the last block (and its pooler)
        self.ln = nn.LayerNorm(cfg.d_model)
        d_in = cfg.d_model * (4 if cfg.dual else 1)
        self.head = nn.Sequential(nn.Linear(d_in, cfg.d_model), nn.ReLU(), nn.Linear(cfg.d_model, cfg.n_classes))

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # tokens, mask: (B, L); mask True = real token
        B, L = tokens.shape
        if self.cfg.pooling == "cls":
            cls_tok = torch.full((B, 1), self.cfg.vocab_size, dtype=tokens.dtype, device=tokens.device)
            tokens = torch.cat([cls_tok, tokens], 1)
            mask = same_padding(torch.cat([torch.ones_like(mask[:, :1]), mask], 1), mask)  # host-known padding
            L += 1
        pos = torch.arange(L, device=tokens.device)
        x = self.drop(self.tok(tokens) + self.pos(pos)[None])  # (B, L, d)
        attn_mask = mask if self.cfg.attention_padding_mask else None
        for blk, pool, has in zip(self.blocks, self.poolers, self._has_pooler):
            x = blk(x, attn_mask)
            if has:
                x, mask = apply_pooler(pool, x, mask)
                attn_mask = mask if self.cfg.attention_padding_mask else None
        x = self.ln(x) * mask[..., None].to(x.dtype)
        return x[:, 0] if self.cfg.pooling == "cls" else x.mean(1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, tokens2: torch.Tensor | None = None, mask2: torch.Tensor | None = None):
        x0 = self.encode(tokens, mask)
        if not self.cfg.dual:
            return self.head(x0)
        x1 = self.encode(tokens2, mask2)
        return self.head(torch.cat([x0, x1, x0 * x1, x0 - x1], -1))

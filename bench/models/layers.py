"""Building blocks shared by every backbone: multi-head attention with a pluggable core, the position-wise
``FeedForward`` a method may wrap or replace (``Method.ffn``), and the pre-LN block."""
from __future__ import annotations

import torch
from torch import nn

from bench.method import AttentionSpec, FFNSpec

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


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


class FeedForward(nn.Module):
    """``drop(fc2(drop(act(fc1(x)))))`` with ``fc1: d_model -> d_ff``, ``fc2: d_ff -> d_model``.

    The backbones' default FFN (what a method's ``make_ffn`` receives). Methods read ``fc1``, ``fc2`` (Linear
    modules, e.g. pretrained weights) and ``activation`` (the name). ``fc1``/``fc2``/``act`` may be given as
    existing modules to share them (the HF adapter shares a BERT layer's own Linears); otherwise they are created
    in the order fc1, act, fc2, so parameter creation and init order equal ``Sequential(Linear, GELU, Dropout,
    Linear, Dropout)``."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, *,
                 fc1: nn.Linear | None = None, fc2: nn.Linear | None = None, act: nn.Module | None = None):
        super().__init__()
        if act is None and activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: valid are {', '.join(ACTIVATIONS)} (or pass act=)")
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.fc1 = fc1 if fc1 is not None else nn.Linear(d_model, d_ff)
        self.act = act if act is not None else ACTIVATIONS[activation]()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = fc2 if fc2 is not None else nn.Linear(d_ff, d_model)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def method_ffn(method, spec: FFNSpec, dropout: float) -> tuple[nn.Module, FeedForward]:
    """The backbone's default ``FeedForward`` for ``spec`` and what ``method.ffn`` makes of it: (ffn, default)."""
    default = FeedForward(spec.d_model, spec.d_ff, spec.activation, dropout)
    return method.ffn(spec, default), default


class PreLNBlock(nn.Module):
    """x + Drop(MHA(LN(x))); x + FFN(LN(x)), FFN = ``method.ffn(FFNSpec, FeedForward)`` (default: Linear -> GELU
    -> Drop -> Linear -> Drop). The FFN spec has the attention spec's layer and ``max_len``; its stack is
    ``stack`` (default: the attention spec's)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, method, spec: AttentionSpec, dropout: float,
                 d_qkv: int | None = None, stack: str | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, method, spec, dropout, d_qkv)
        self.ln2 = nn.LayerNorm(d_model)
        ffn_spec = FFNSpec(layer=spec.layer, stack=stack or spec.stack, d_model=d_model, d_ff=d_ff,
                           activation="gelu", max_len=spec.max_len)
        self.mlp, default = method_ffn(method, ffn_spec, dropout)
        self._ffn_default = (default,)  # a plain reference (not a submodule): what the method was given

    @property
    def ffn_default(self) -> FeedForward:
        """The default ``FeedForward`` built for this block (``self.mlp`` unless the method wrapped/replaced it)."""
        return self._ffn_default[0]

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_padding_mask)
        return x + self.mlp(self.ln2(x))


def residual_fc2(block: nn.Module) -> nn.Linear | None:
    """The FFN's output projection of a block (``block.mlp``) for residual-scaled init: ``mlp.fc2`` when the FFN
    has a Linear ``fc2``, else the default's ``fc2`` when the method wrapped the default (it is part of the FFN),
    else None (a replacement without ``fc2``: nothing to scale)."""
    fc2 = getattr(block.mlp, "fc2", None)
    if isinstance(fc2, nn.Linear):
        return fc2
    default = getattr(block, "ffn_default", None)
    if default is not None and any(m is default for m in block.mlp.modules()):
        return default.fc2
    return None


def apply_pooler(pooler: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, mask = pooler(x, mask)`` with the token mask (B, L) bool, True = real; a pooler that returns no mask
    means every kept position is real."""
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    x, mask = pooler(x, mask)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return x, mask

"""Dense attention baselines: ``dense`` (SDPA, backend selectable), ``flex`` (FlexAttention), ``eager``.

Every sparse method is compared with the fastest of these measured in the same run, never with
``eager`` alone. ``dense`` with ``backend=auto`` lets PyTorch pick its fastest kernel; ``cudnn``,
``flash``, ``efficient`` and ``math`` force one (and fail loudly if it cannot run the inputs).
SDPA's flash kernel takes no mask; with key padding we run it on a jagged nested tensor (the real tokens
only, variable length), which is exact and is what a user would do.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.method import AttentionCore, AttentionSpec, Method
from bench.registry import register_method


def eager_attention(q, k, v, key_padding_mask=None, causal=False, sm_scale=None):
    """Textbook softmax attention; (B, H, Lq, D) x (B, H, Lk, D). Materialises (B, H, Lq, Lk)."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed, diagonal=s.shape[-1] - s.shape[-2])
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows -> 0, not NaN
    return torch.matmul(p.to(v.dtype), v)


_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


@dataclass(frozen=True)
class SDPAConfig:
    backend: str = "auto"  # auto | cudnn | flash | efficient | math

    def __post_init__(self):
        if self.backend != "auto" and self.backend not in _BACKENDS:
            raise BenchError(f"dense: unknown SDPA backend {self.backend!r}; valid: auto, {', '.join(_BACKENDS)}")



class SDPACore(AttentionCore):
    def __init__(self, spec: AttentionSpec, backend: str):
        super().__init__(spec)
        self.backend = backend  # validated by SDPAConfig

    def _ctx(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self.backend == "auto":
            import contextlib

            return contextlib.nullcontext()
        return sdpa_kernel([getattr(SDPBackend, _BACKENDS[self.backend])])

    def forward(self, q, k, v, key_padding_mask=None):
        with self._ctx():
            if (self.backend == "flash" and not self.spec.causal and q.shape[2] == k.shape[2]
                    and has_padding(key_padding_mask)):
                return _sdpa_jagged(q, k, v, key_padding_mask)
            return masked_sdpa(q, k, v, key_padding_mask, self.spec.causal)


class _PerMask:
    """One value computed from the last padding-mask tensor seen (and an extra key): every layer of a model gets
    the same mask tensor for a batch, so the value is computed once per batch, not once per layer. A weak
    reference never matches a new tensor; the tensor's ``_version`` catches an in-place edit."""

    def __init__(self):
        self._entry: tuple = ()  # (weakref to the mask, (its _version, key), value)

    def get(self, mask: torch.Tensor, key, compute):
        e = self._entry
        if e and e[0]() is mask and e[1] == (mask._version, key):
            return e[2]
        value = compute()
        self._entry = (weakref.ref(mask), (mask._version, key), value)
        return value


_ANY_PADDING = _PerMask()


def has_padding(key_padding_mask) -> bool:
    """Does this (B, Lk) mask hide any key? A device-to-host sync, asked once per batch (``_PerMask``)."""
    if key_padding_mask is None:
        return False
    return _ANY_PADDING.get(key_padding_mask, None, lambda: not bool(key_padding_mask.all()))


def masked_sdpa(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
    """SDPA with key padding (B, Lk) and/or causality, under whatever backend context the caller set.

    Broadcast masks only: a materialised (B, 1, Lq, Lk) mask made SDPA read O(L^2) bytes and ran padded
    dense baselines ~40 % slower (results/errata.json). Causal with Lq != Lk: the queries are the last Lq
    positions (bottom-right aligned diagonal); one new query (KV-cache decoding) sees every cached key.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    causal = causal and Lq > 1
    if not has_padding(key_padding_mask):
        key_padding_mask = None  # no padding in this batch: let every backend run maskless
    if key_padding_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    mask = None
    if causal:
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        mask = kpm if mask is None else mask & kpm
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    # rows with no visible key come back NaN from some backends; they are padding queries
    return out.nan_to_num(0.0)


def _sdpa_jagged(q, k, v, key_padding_mask):
    """Self-attention over the real tokens only, via a jagged nested tensor (flash takes no mask).
    Padding queries get 0. Assumes real tokens are a prefix or any subset: we gather them per row."""
    B, H, L, D = q.shape
    lengths = key_padding_mask.sum(1)
    idx = key_padding_mask.reshape(-1).nonzero().squeeze(1)  # flat positions of real tokens
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=q.device)
    offsets[1:] = lengths.cumsum(0)

    def pack(x):  # (B, H, L, D) -> jagged (B, H, j, D)
        flat = x.transpose(1, 2).reshape(B * L, H, D)[idx]  # (T, H, D)
        return torch.nested.nested_tensor_from_jagged(flat, offsets).transpose(1, 2)

    o = F.scaled_dot_product_attention(pack(q), pack(k), pack(v))  # jagged (B, H, j, D)
    flat = o.transpose(1, 2).values()  # (T, H, D)
    out = q.new_zeros(B * L, H, D)
    out = out.index_copy(0, idx, flat)
    return out.view(B, L, H, D).transpose(1, 2)


@register_method("dense")
class Dense(Method):
    Config = SDPAConfig

    def make_attention(self, spec):
        return SDPACore(spec, self.cfg.backend)


@dataclass(frozen=True)
class FlexConfig:
    compile: str = "auto"  # auto (compile on CUDA) | on | off

    def __post_init__(self):
        if self.compile not in ("auto", "on", "off"):
            raise BenchError(f"flex: compile={self.compile!r}; valid: auto, on, off")


class FlexCore(AttentionCore):
    """Dense FlexAttention; key padding through a mask_mod. The BlockMask is built once per batch and shared by
    every layer that gets the same padding-mask tensor (benchmarks_and_baselines.md: rebuilding it per layer
    costs Flex a large share of its throughput)."""

    _compiled = {}
    _block_masks = _PerMask()  # the last batch's BlockMask, per (Lq, Lk, causal)

    def __init__(self, spec, compile_mode: str):
        super().__init__(spec)
        self.compile_mode = compile_mode

    def _fns(self, device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        use = self.compile_mode == "on" or (self.compile_mode == "auto" and device.type == "cuda")
        if not use:
            return flex_attention, create_block_mask
        if "fa" not in FlexCore._compiled:
            FlexCore._compiled["fa"] = torch.compile(flex_attention, dynamic=False)
            FlexCore._compiled["cbm"] = torch.compile(create_block_mask)
        return FlexCore._compiled["fa"], FlexCore._compiled["cbm"]

    def forward(self, q, k, v, key_padding_mask=None):
        flex, cbm = self._fns(q.device)
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        causal = self.spec.causal and Lq > 1
        if not has_padding(key_padding_mask):
            key_padding_mask = None
        if key_padding_mask is None and not causal:
            return flex(q, k, v)
        kpm, offset = key_padding_mask, Lk - Lq  # causal diagonal aligned bottom-right

        def mask_mod(b, h, q_idx, kv_idx):
            ok = kv_idx <= q_idx + offset if causal else kv_idx >= 0
            return ok & kpm[b, kv_idx] if kpm is not None else ok

        def build():
            return cbm(mask_mod, B if kpm is not None else None, None, Lq, Lk, device=q.device)

        block_mask = build() if kpm is None else FlexCore._block_masks.get(kpm, (Lq, Lk, causal), build)
        out = flex(q, k, v, block_mask=block_mask)
        if kpm is not None:  # queries that see no key (all-padding rows) are padding: zero them
            out = out * kpm.any(1)[:, None, None, None].to(out.dtype)
        return out


@register_method("flex")
class Flex(Method):
    Config = FlexConfig

    @classmethod
    def unavailable_reason(cls, device):
        if device.type != "cuda":
            return "FlexAttention has no backward pass on CPU (PyTorch limitation); runs on CUDA only"
        return None

    def make_attention(self, spec):
        return FlexCore(spec, self.cfg.compile)


class EagerCore(AttentionCore):
    def forward(self, q, k, v, key_padding_mask=None):
        return eager_attention(q, k, v, key_padding_mask, self.spec.causal)


@register_method("eager")
class Eager(Method):
    def make_attention(self, spec):
        return EagerCore(spec)

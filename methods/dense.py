"""Dense attention baselines: ``dense`` (SDPA, backend selectable), ``flex`` (FlexAttention), ``eager``.

Every sparse method is compared with the fastest of these measured in the same run, never with
``eager`` alone. ``dense`` with ``backend=auto`` lets PyTorch pick its fastest kernel; ``cudnn``,
``flash``, ``efficient`` and ``math`` force one (and fail loudly if it cannot run the inputs).
SDPA's flash kernel takes no mask; with key padding we run it on a jagged nested tensor (the real tokens
only, variable length), which is exact and is what a user would do. The attention primitives live in
``bench/attention.py`` (shared with sparse methods' dense paths).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.attention import PerMask, eager_attention, has_padding, masked_sdpa, sdpa_jagged
from bench.errors import BenchError
from bench.method import AttentionCore, AttentionSpec, Method
from bench.registry import register_method


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
                return sdpa_jagged(q, k, v, key_padding_mask)
            return masked_sdpa(q, k, v, key_padding_mask, self.spec.causal)


@register_method("dense")
class Dense(Method):
    Config = SDPAConfig
    family = "dense"

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
    _block_masks = PerMask()  # the last batch's BlockMask, per (Lq, Lk, causal)

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
    family = "dense"

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
    family = "dense"

    def make_attention(self, spec):
        return EagerCore(spec)

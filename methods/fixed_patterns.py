"""Fixed block-sparse patterns on the shared kernel: ``local``, ``longformer``, ``bigbird``, ``strided``.

Each layer gets one static layout (shared by its heads) from ``kernels.layout`` and runs
``block_sparse_attention(..., softmax_mode="renorm")`` (standard softmax over the kept keys) from step 0.
The pattern's parameters are given in blocks; with ``density > 0`` the free parameter of the pattern
(window, random blocks or stride) is instead chosen so that the layer's block density is as close as
possible to that target for its nb, which lets reports compare patterns at equal density. Block sizes
follow the rule shared with SPION (``bench.blocks``: spion.md §4.1 per LRA task) so that layouts are comparable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.blocks import block_size
from bench.errors import BenchError
from bench.method import AttentionCore, AttentionSpec, Method, MethodContext
from bench.registry import register_method
from kernels import (bigbird_layout, block_sparse_attention, block_sparse_flops, layout_density, local_layout, longformer_layout,
                     resolve_backend, strided_layout)


@dataclass(frozen=True)
class LocalConfig:
    block_size: int = 64
    window_blocks: int = 1  # keep |i - j| <= window_blocks
    density: float = 0.0  # > 0: choose window_blocks to hit this block density instead
    backend: str = "auto"
    note: str = ""


@dataclass(frozen=True)
class LongformerConfig:
    block_size: int = 64
    window_blocks: int = 1
    global_blocks: int = 1  # the first blocks attend and are attended everywhere
    density: float = 0.0  # > 0: choose window_blocks
    backend: str = "auto"
    note: str = ""


@dataclass(frozen=True)
class BigBirdConfig:  # ITC BigBird at block 64: 3 window blocks, 2 global, 3 random per row
    block_size: int = 64
    window_blocks: int = 1
    global_blocks: int = 2
    random_blocks: int = 3
    density: float = 0.0  # > 0: choose random_blocks
    seed: int = 0  # random blocks: fixed per (seed, layer), identical across runs
    backend: str = "auto"
    note: str = ""


@dataclass(frozen=True)
class StridedConfig:  # Sparse Transformer (Child et al.), non-causal block form. Child et al. use a local
    # window equal to the stride (~sqrt(L) tokens); at block granularity that is < 1 block on LRA, so the
    # local part is a fixed band and the stride (in blocks) is the free parameter
    block_size: int = 64
    local_blocks: int = 2  # keep |i - j| < local_blocks (2: the 3-block band of ``local``)
    stride_blocks: int = 0  # keep columns j with j % stride == stride - 1; 0 = round(sqrt(nb))
    density: float = 0.0  # > 0: choose stride_blocks
    backend: str = "auto"
    note: str = ""


class FixedCore(AttentionCore):
    def __init__(self, spec: AttentionSpec, block_size: int, backend: str, build):
        super().__init__(spec)
        self.block_size, self.backend, self.build = block_size, backend, build
        self.layouts: dict[tuple[int, str], torch.Tensor] = {}  # (nb, device) -> (1, nb, nb); not in state_dict

    def layout_for(self, nb: int, device) -> torch.Tensor:
        key = (nb, str(device))
        if key not in self.layouts:  # one tensor per (nb, device): the kernels cache their LUTs by identity
            self.layouts[key] = self.build(nb).to(device)
        return self.layouts[key]

    def forward(self, q, k, v, key_padding_mask=None):  # (B, H, L, D); mask (B, L), True = real
        nb = math.ceil(q.shape[2] / self.block_size)
        # The Triton path reads the layout's bytes on the host on every call to find its LUT: a CPU layout costs a
        # memcmp, a CUDA one a device-to-host copy, i.e. one stream sync per layer per step (issue 15). The torch
        # reference computes with the layout on q's device: it gets a copy there, made once.
        where = "cpu" if resolve_backend(self.backend, q) == "triton" else q.device
        return block_sparse_attention(q, k, v, self.layout_for(nb, where), block_size=self.block_size,
                                      causal=self.spec.causal, key_padding_mask=key_padding_mask,
                                      softmax_mode="renorm", backend=self.backend)

    def flops(self, q, k, key_padding_mask=None) -> float:  # what the kernel multiplies: whole kept blocks
        B, H, L, D = q.shape
        lay = self.layout_for(math.ceil(L / self.block_size), "cpu")
        return float(block_sparse_flops(lay, self.block_size, B, D, causal=self.spec.causal, lq=L, lk=L, n_heads=H))

    def density(self) -> float | None:
        return layout_density(next(reversed(self.layouts.values()))) if self.layouts else None


def _closest(build, candidates, target: float):
    """The candidate parameter whose layout density is closest to target (ties: the smaller parameter)."""
    return min(candidates, key=lambda p: (abs(layout_density(build(p)) - target), p))


class _FixedPattern(Method):
    family = "fixed_pattern"
    suites = ("lra",)

    @classmethod
    def default_config(cls, ctx: MethodContext):
        block, note = block_size(ctx)
        return cls.Config(block_size=block, note=note)

    def params(self, nb: int, layer: int) -> dict:
        """The pattern's parameters (in blocks) for a layer of nb blocks."""
        raise NotImplementedError

    def layout(self, nb: int, layer: int, **params) -> torch.Tensor:
        raise NotImplementedError

    def make_attention(self, spec: AttentionSpec) -> AttentionCore:
        if self.cfg.density < 0 or self.cfg.density > 1:
            raise BenchError(f"{self.name}: density={self.cfg.density}; expected 0 (use the explicit parameters) "
                             "or a target in (0, 1]")
        return FixedCore(spec, self.cfg.block_size, self.cfg.backend,
                         lambda nb: self.layout(nb, spec.layer, **self.params(nb, spec.layer)))

    def info(self) -> dict:
        dens, params = [], []
        for core in self.cores:
            nb = math.ceil(core.spec.max_len / self.cfg.block_size)
            dens.append(layout_density(core.layout_for(nb, "cpu"), causal=core.spec.causal))  # blocks computed
            params.append(self.params(nb, core.spec.layer))
        out = {"block_size": self.cfg.block_size, "softmax_mode": "renorm", "density_per_layer": dens,
               "params_per_layer": params}
        if self.cores:
            core = self.cores[0]
            nb = math.ceil(core.spec.max_len / self.cfg.block_size)
            if nb <= 64:
                out["layout_layer0"] = core.layout_for(nb, "cpu")[0].to(torch.uint8).tolist()
        if self.cfg.density:
            out["target_density"] = self.cfg.density
        if self.cfg.note:
            out["note"] = self.cfg.note
        return out


@register_method("local")
class Local(_FixedPattern):
    Config = LocalConfig

    def params(self, nb, layer):
        w = self.cfg.window_blocks
        if self.cfg.density:
            w = _closest(lambda p: local_layout(nb, p), range(nb), self.cfg.density)
        return {"window_blocks": w}

    def layout(self, nb, layer, window_blocks):
        return local_layout(nb, window_blocks)


@register_method("longformer")
class Longformer(_FixedPattern):
    Config = LongformerConfig

    def params(self, nb, layer):
        w, g = self.cfg.window_blocks, self.cfg.global_blocks
        if self.cfg.density:
            w = _closest(lambda p: longformer_layout(nb, p, g), range(nb), self.cfg.density)
        return {"window_blocks": w, "global_blocks": g}

    def layout(self, nb, layer, window_blocks, global_blocks):
        return longformer_layout(nb, window_blocks, global_blocks)


@register_method("bigbird")
class BigBird(_FixedPattern):
    Config = BigBirdConfig

    def params(self, nb, layer):
        r = self.cfg.random_blocks
        if self.cfg.density:
            r = _closest(lambda p: self.layout(nb, layer, self.cfg.window_blocks, self.cfg.global_blocks, p),
                         range(nb), self.cfg.density)
        return {"window_blocks": self.cfg.window_blocks, "global_blocks": self.cfg.global_blocks, "random_blocks": r}

    def layout(self, nb, layer, window_blocks, global_blocks, random_blocks):
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + layer)  # deterministic per layer
        return bigbird_layout(nb, window_blocks, global_blocks, random_blocks, generator=g)


@register_method("strided")
class Strided(_FixedPattern):
    Config = StridedConfig

    def params(self, nb, layer):
        s = self.cfg.stride_blocks or max(1, round(math.sqrt(nb)))
        if self.cfg.density:
            s = _closest(lambda p: strided_layout(nb, self.cfg.local_blocks, p), range(1, nb + 1), self.cfg.density)
        return {"local_blocks": self.cfg.local_blocks, "stride_blocks": s}

    def layout(self, nb, layer, local_blocks, stride_blocks):
        return strided_layout(nb, local_blocks, stride_blocks)

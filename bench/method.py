"""The method interface: what a sparse (or dense) method may change, and the hooks it gets.

A method supplies the attention core for each attention layer (``make_attention``) and may act at
phase changes through hooks the training loop calls; tasks and backbones never know which method runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bench.train import Trainer


@dataclass(frozen=True)
class AttentionSpec:
    """What a backbone tells a method about one attention layer."""

    layer: int  # index within its stack
    n_heads: int
    head_dim: int
    max_len: int  # longest sequence this layer will see (padded), for layouts
    causal: bool = False
    kind: str = "self"  # self | decoder_self | cross
    stack: str = "encoder"  # encoder | decoder


@dataclass(frozen=True)
class NoConfig:
    pass


class AttentionCore(nn.Module):
    """``forward(q, k, v, key_padding_mask) -> out``, all (B, H, L, D); mask (B, Lk) bool, True = real."""

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        raise NotImplementedError


class Method:
    """Base class. Subclasses set ``Config`` (a frozen dataclass) and implement ``make_attention``."""

    name: str = "?"
    Config: type = NoConfig
    family: str = "dense"  # dense | sparse: reports compare each sparse method with the best dense one
    suites: tuple[str, ...] = ()  # suites this method runs in by default (dense baselines run everywhere)
    variant: str = ""  # set from 'name:key=value' on the command line; shown in reports

    def __init__(self, cfg: Any, task: Any = None):
        self.cfg = cfg
        self.task = task
        self.cores: list[AttentionCore] = []

    @classmethod
    def default_config(cls, task_name: str, scale: str) -> Any:
        """Per-task defaults (e.g. SPION's per-task quantile); override in subclasses."""
        return cls.Config()

    def make_attention(self, spec: AttentionSpec) -> AttentionCore:
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """None if the method can train on ``device``, else a one-line reason (the sweep skips it)."""
        return None

    def attention(self, spec: AttentionSpec) -> AttentionCore:
        """Called by backbones: builds the core and keeps a handle so hooks can reach every layer."""
        core = self.make_attention(spec)
        self.cores.append(core)
        return core

    def make_encoder_pooler(self, layer: int, d_model: int, max_len: int) -> nn.Module | None:
        """Token-dropping methods (top-k pooling / Pyramidion): a module run after encoder layer ``layer`` as
        ``x, mask = pooler(x, mask)`` that may shorten the sequence (``bench/models/seq2seq.py``). None = keep."""
        return None

    # ---- hooks (all optional) -------------------------------------------------------------
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def before_step(self, trainer: "Trainer", step: int) -> None: ...

    def after_step(self, trainer: "Trainer", step: int) -> None: ...

    def on_eval(self, trainer: "Trainer", step: int, dev_metrics: dict) -> None: ...

    def extra_loss(self, trainer: "Trainer", batch: Any, model_output: Any) -> torch.Tensor | None:
        return None

    def info(self) -> dict:
        """Method-specific facts for the record (achieved density per layer, transition step, ...)."""
        return {}

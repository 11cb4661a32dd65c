"""The method contract: what a method may change in a model, how it trains, and what it reports.

A method may supply, per layer of any backbone (LRA encoder, GPT decoder, seq2seq encoder/decoder, HF BERT):

- the **attention core** (``make_attention(AttentionSpec)``): ``forward(q, k, v, key_padding_mask)`` on (B, H, L, D);
- the **FFN** (``make_ffn(FFNSpec, default)``): given the backbone's own ``FeedForward`` (with its weights, e.g.
  pretrained), return it, wrap it or replace it; ``forward(x (B, L, d)) -> (B, L, d)``;
- a **pooler** after an encoder layer (``make_pooler(PoolerSpec)``): ``forward(x, mask) -> (x, mask)`` that may
  shorten the sequence; ``output_length(L)`` tells the backbone the length the next layers are built for.

It runs as an ordered protocol of **stages** (``stages(ctx)``, ``bench/stages.py``): training stages with their own
steps, schedule, optimizer and frozen parameters, compute stages whose output is cached as an artifact, and an
operating-point sweep. Its defaults come from the task's model config and scale (``default_config(ctx)``), never
from another method or a task module. ``family`` places it in reports; ``report_section`` may add its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bench.train import Trainer

# Families a report groups methods by (reports never name a method).
FAMILIES = ("dense", "fixed_pattern", "learned_pattern", "token_pooling", "estimated", "ffn_sparsity")


@dataclass(frozen=True)
class AttentionSpec:
    """What a backbone tells a method about one attention layer. ``max_len`` is the longest query length the layer
    sees (padded); ``max_len_kv`` the longest key length when it differs (cross-attention, or after a pooler)."""

    layer: int  # index within its stack
    n_heads: int
    head_dim: int
    max_len: int
    causal: bool = False
    kind: str = "self"  # self | decoder_self | cross
    stack: str = "encoder"  # encoder | decoder
    max_len_kv: int | None = None

    @property
    def lq(self) -> int:
        return self.max_len

    @property
    def lk(self) -> int:
        return self.max_len_kv if self.max_len_kv is not None else self.max_len


@dataclass(frozen=True)
class FFNSpec:
    """One position-wise FFN: ``fc2(act(fc1(x)))`` with ``fc1: d_model -> d_ff``."""

    layer: int
    stack: str  # encoder | decoder
    d_model: int
    d_ff: int
    activation: str  # gelu | relu | ... (the backbone's)
    max_len: int = 0  # longest sequence it sees (after poolers)


@dataclass(frozen=True)
class PoolerSpec:
    """A pooler slot after encoder layer ``layer`` whose input is at most ``max_len`` tokens long."""

    layer: int
    d_model: int
    max_len: int
    stack: str = "encoder"


@dataclass(frozen=True)
class MethodContext:
    """What the harness tells a method when it computes its defaults: the task, its suite, the scale and the
    task's model and data configs (so e.g. a block size can be chosen from the real sequence length)."""

    task: str
    suite: str | None
    scale: str
    model: Any = None
    data: Any = None

    @property
    def max_len(self) -> int | None:
        for cfg in (self.model, self.data):
            for name in ("max_len", "max_src_len", "ctx"):
                v = getattr(cfg, name, None)
                if isinstance(v, int) and v > 0:
                    return v
        return None


@dataclass(frozen=True)
class NoConfig:
    pass


class AttentionCore(nn.Module):
    """``forward(q, k, v, key_padding_mask) -> out``, all (B, H, L, D); mask (B, Lk) bool, True = real.

    ``flops(q, k, key_padding_mask)`` is what the core computes for the cost accounting (``bench/cost.py``):
    multiply-adds of QK^T and PV times two. Dense cores count every (query, key) pair they compute (causal: the
    lower triangle); sparse cores override it with the exact count of what their kernel computes."""

    probe = None  # set by ``bench.probe.Probe`` while it records attention probabilities

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        raise NotImplementedError

    def flops(self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> float:
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        pairs = Lq * Lk
        if self.spec.causal and Lq > 1:
            off = Lk - Lq  # bottom-right aligned diagonal
            pairs = sum(min(Lk, max(0, i + off + 1)) for i in range(Lq))
        return 4.0 * B * H * pairs * D


class Method:
    """Base class. Subclasses set ``Config`` (a frozen dataclass), ``family`` and implement ``make_attention``."""

    name: str = "?"
    Config: type = NoConfig
    family: str = "dense"  # one of FAMILIES
    suites: tuple[str, ...] = ()  # suites this method runs in by default (dense baselines run everywhere)
    variant: str = ""  # set from 'name:key=value' on the command line; shown in reports

    def __init__(self, cfg: Any, task: Any = None):
        self.cfg = cfg
        self.task = task
        self.cores: list[AttentionCore] = []
        self.ffns: list[nn.Module] = []
        self.poolers: list[nn.Module] = []

    @classmethod
    def default_config(cls, ctx: MethodContext) -> Any:
        """Defaults for this task and scale (e.g. SPION's per-task quantile); override in subclasses."""
        return cls.Config()

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """None if the method can train on ``device``, else a one-line reason (the sweep skips it)."""
        return None

    # ---- model hooks: backbones call attention(), ffn() and pooler(); methods override make_* ------------------
    def make_attention(self, spec: AttentionSpec) -> AttentionCore:
        raise NotImplementedError

    def make_ffn(self, spec: FFNSpec, default: nn.Module) -> nn.Module:
        return default

    def make_pooler(self, spec: PoolerSpec) -> nn.Module | None:
        return None

    def attention(self, spec: AttentionSpec) -> AttentionCore:
        core = self.make_attention(spec)
        self.cores.append(core)
        return core

    def ffn(self, spec: FFNSpec, default: nn.Module) -> nn.Module:
        module = self.make_ffn(spec, default)
        self.ffns.append(module)
        return module

    def pooler(self, spec: PoolerSpec) -> nn.Module | None:
        module = self.make_pooler(spec)
        if module is not None:
            out = module.output_length(spec.max_len)
            if not isinstance(out, int) or not 0 < out <= spec.max_len:
                from bench.errors import BenchError

                raise BenchError(f"{self.name}: pooler after {spec.stack} layer {spec.layer} gives output_length "
                                 f"{out!r} for {spec.max_len} tokens; expected 1..{spec.max_len}")
            self.poolers.append(module)
        return module

    # ---- protocol ---------------------------------------------------------------------------------------------
    def stages(self, trainer: "Trainer") -> list:
        """The ordered stages of a run (``bench.stages``); default: one training stage with the task's budget."""
        from bench.stages import Train

        return [Train("train")]

    def loss(self, trainer: "Trainer", batch: Any, task_loss: torch.Tensor, output: Any) -> torch.Tensor:
        """The loss a training step minimises; default: the task loss plus ``extra_loss`` if any. Distillation
        methods combine task, teacher and their own terms here with their own weights."""
        extra = self.extra_loss(trainer, batch, output)
        return task_loss if extra is None else task_loss + extra

    # ---- hooks (all optional) -------------------------------------------------------------------------------
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_stage_start(self, trainer: "Trainer", stage) -> None: ...

    def on_stage_end(self, trainer: "Trainer", stage) -> None: ...

    def before_step(self, trainer: "Trainer", step: int) -> None: ...

    def after_step(self, trainer: "Trainer", step: int) -> None: ...

    def on_eval(self, trainer: "Trainer", step: int, dev_metrics: dict) -> None: ...

    def extra_loss(self, trainer: "Trainer", batch: Any, model_output: Any) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict:
        """What a killed run needs to resume after a finished stage, beyond the model's weights and the payloads
        of its Compute stages (which the Trainer saves and re-applies): e.g. SPION's layouts. Default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def info(self) -> dict:
        """Method-specific facts for the record (achieved density per layer, transition step, ...)."""
        return {}

    # ---- reports ----------------------------------------------------------------------------------------------
    @classmethod
    def report_section(cls, runs, ctx) -> tuple[list[str], list]:
        """Markdown lines and figure paths this method adds to its suite's report, given its runs (a pandas frame
        of one scale, every method of the suite, see ``bench.report``) and ``ctx`` (``bench.report.SectionContext``).
        Default: nothing."""
        return [], []

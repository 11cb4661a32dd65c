"""Cost accounting of one forward pass: FLOPs per token, attention density per layer, FFN work executed, parameters.

``forward_cost(model, method, forward, n_tokens)`` runs ``forward()`` once under ``torch.no_grad()`` with forward
hooks on the model's modules and returns a JSON-able dict (``COST_KEYS``). What is counted, exactly:

- **FLOPs** are multiply-adds times two (one multiply-add = 2 FLOPs), of the matrix products only.
- **Every ``nn.Linear``**: ``2 * in_features * out_features`` per row it processes, rows = ``input.numel() /
  in_features`` (batch x positions, padding included: a backbone computes its projections on padded positions
  too). The bias add is not counted. A Linear called twice (e.g. a tied LM head, a shared encoder in LRA
  Retrieval) is counted twice.
- **Every ``AttentionCore``** (``bench/method.py``) in ``method.cores``: ``core.flops(q, k, key_padding_mask)`` per
  call, with the arguments of that call (captured by the forward hook, read after the call so that a core whose
  count depends on state it computes in ``forward``, a layout, say, reports this call's). The base class counts
  ``4 * B * H * pairs * D`` (QK^T and PV) with every (query, key) pair of the rectangle (causal: the bottom-right
  aligned lower triangle); padded keys are counted (dense kernels compute them). Sparse cores override
  ``flops`` with the exact count their kernel computes. Linears inside a core (an estimator, say) are counted as
  Linears, on top of ``core.flops``.
- **Modules that report their own cost** (the protocol, e.g. an MoE FFN that executes a data-dependent share of
  its experts): a module with a method ``last_cost() -> dict(flops=<float>, executed_fraction=<float in [0, 1]>)``
  describing its most recent forward call. ``forward_cost`` reads it in a forward hook after *each* call of that
  module (so a module called twice per forward is counted twice) and counts ``flops`` instead of anything inside
  it: its Linear children (and cores) are not counted separately. ``executed_fraction`` is the share of the dense
  module's work it executed (1.0 for a dense FFN); optional keys are ignored.
- **Tied output projections that bypass ``nn.Linear``**: the seq2seq model's tied ``x @ tgt_emb.weight.t()``
  (``Seq2SeqTransformer`` with ``out_proj=None``) is counted as a Linear ``d_model -> vocab`` on every row that
  goes through ``dec_ln`` (which only ``_logits`` calls).
- **Not counted**: embeddings (lookups), positional encodings, softmax, LayerNorm, activations, dropout,
  residual adds, poolers' gathers, the loss, and anything done outside module calls (``torch.matmul`` in a
  model's own ``forward``, other than the tied projection above).

Other fields: ``attention_density_by_layer`` (over ``method.cores`` in order): ``core.density()`` when the core has
it (the fraction of (q, k) pairs it computes, in [0, 1]), else ``sum(core.flops) / sum(dense_pairs_flops)`` over the
core's calls, the dense reference honouring the core's causality (a dense core is 1.0, causal or not); None for a
core the forward did not call. ``attention_count_by_layer``: ``"core"`` where the core overrides ``flops``,
``"all_pairs"`` where it inherits the dense count (right for dense cores; for a sparse core it means its count is
still to be written, and its FLOPs and density read as dense). ``ffn_executed_fraction``: the mean over
``method.ffns`` of each FFN's ``executed_fraction`` (the mean over its calls in this forward; 1.0 for an FFN that
does not report one).
``params`` / ``trainable_params`` / ``embedding_params`` count each parameter tensor once (tied weights once).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from bench.method import AttentionCore

COST_KEYS = (
    "flops_per_token", "attention_flops_per_token", "linear_flops_per_token", "reported_flops_per_token",
    "forward_flops", "n_tokens", "attention_density_by_layer", "attention_flops_by_layer", "attention_count_by_layer",
    "ffn_executed_fraction", "params", "trainable_params", "embedding_params", "counting",
)
COUNTING = "v1: 2 FLOPs per multiply-add of Linear and attention products; no softmax/norms/embeddings"


def causal_pairs(Lq: int, Lk: int) -> int:
    """(query, key) pairs under a causal mask whose diagonal is aligned bottom-right (query i sees keys
    ``<= i + Lk - Lq``); equals ``AttentionCore.flops``'s row-by-row sum, in closed form."""
    if Lq <= 1:
        return Lq * Lk
    start = max(Lk - Lq + 1, 1)  # keys seen by row 0 (rows below see one more each, the last sees all Lk)
    if start > Lk:
        return 0
    return (Lk * (Lk + 1) - (start - 1) * start) // 2


def dense_pairs_flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool = False) -> float:
    """FLOPs of dense attention (QK^T and PV, 2 per multiply-add) over every pair, or the causal triangle."""
    pairs = causal_pairs(Lq, Lk) if causal else Lq * Lk
    return 4.0 * B * H * pairs * D


def count_params(model: nn.Module) -> dict:
    """``params``, ``trainable_params`` and ``embedding_params`` (``nn.Embedding`` weights), each tensor once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    emb: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            emb[id(m.weight)] = m.weight.numel()
    return {"params": int(sum(p.numel() for p in seen.values())),
            "trainable_params": int(sum(p.numel() for p in seen.values() if p.requires_grad)),
            "embedding_params": int(sum(emb.values()))}


def _core_args(args: tuple, kwargs: dict):
    names = ("q", "k", "v", "key_padding_mask")
    vals = dict(zip(names, args))
    for n in names:
        if n in kwargs:
            vals[n] = kwargs[n]
    return vals.get("q"), vals.get("k"), vals.get("key_padding_mask")


def _cores(model: nn.Module, method) -> list[AttentionCore]:
    inside = {id(m) for m in model.modules()}
    cores = [c for c in getattr(method, "cores", None) or [] if id(c) in inside]
    if not cores:  # no method, or the model is a copy of the method's (a teacher): the model's own, in order
        cores = [m for m in model.modules() if isinstance(m, AttentionCore)]
    return cores


def _tied_projections(model: nn.Module) -> list[tuple[nn.Module, int, int]]:
    """(module whose output rows feed an untracked tied projection, d_in, d_out)."""
    try:
        from bench.models.seq2seq import Seq2SeqTransformer
    except ImportError:  # pragma: no cover
        return []
    out = []
    for m in model.modules():
        if isinstance(m, Seq2SeqTransformer) and m.out_proj is None:
            w = m.tgt_emb.weight
            out.append((m.dec_ln, w.shape[1], w.shape[0]))
    return out


def forward_cost(model: nn.Module, method, forward: Callable[[], Any], n_tokens: int) -> dict:
    """Run ``forward()`` once (no grad) and count what it computed (see the module docstring); ``n_tokens`` is what
    "per token" divides by (the caller's choice: e.g. real or padded input tokens of the batch ``forward`` runs)."""
    if not n_tokens or n_tokens <= 0:
        raise ValueError(f"forward_cost: n_tokens must be positive, got {n_tokens!r}")
    cores = _cores(model, method)
    core_idx = {id(c): i for i, c in enumerate(cores)}
    reporters = [m for m in model.modules()
                 if callable(getattr(m, "last_cost", None)) and not isinstance(m, AttentionCore)]
    # modules inside a reporter are covered by its report; nested reporters: the outermost counts
    covered: set[int] = set()
    for r in reporters:
        if id(r) in covered:
            continue
        for sub in r.modules():
            if sub is not r:
                covered.add(id(sub))
    reporters = [r for r in reporters if id(r) not in covered]
    rep_idx = {id(r): i for i, r in enumerate(reporters)}

    linear = [0.0]
    core_flops = [0.0] * len(cores)
    core_dense = [0.0] * len(cores)
    core_calls = [0] * len(cores)
    rep_flops = [0.0] * len(reporters)
    rep_frac: list[list[float]] = [[] for _ in reporters]

    def on_linear(mod, args, out):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and mod.in_features > 0:
            linear[0] += 2.0 * mod.in_features * mod.out_features * (x.numel() // mod.in_features)

    def on_core(mod, args, kwargs, out):
        i = core_idx[id(mod)]
        q, k, kpm = _core_args(args, kwargs)
        if q is None or k is None:
            return
        core_flops[i] += float(mod.flops(q, k, kpm))
        B, H, Lq, D = q.shape
        core_dense[i] += dense_pairs_flops(B, H, Lq, k.shape[2], D,
                                           bool(getattr(getattr(mod, "spec", None), "causal", False)))
        core_calls[i] += 1

    def on_report(mod, args, out):
        i = rep_idx[id(mod)]
        c = mod.last_cost() or {}
        rep_flops[i] += float(c.get("flops", 0.0))
        if c.get("executed_fraction") is not None:
            rep_frac[i].append(float(c["executed_fraction"]))

    def tied(d_in, d_out):
        def hook(mod, args, out):
            linear[0] += 2.0 * d_in * d_out * (out.numel() // d_in)
        return hook

    handles = []
    try:
        for m in model.modules():
            if id(m) in covered:
                continue
            if id(m) in rep_idx:
                handles.append(m.register_forward_hook(on_report))
            elif id(m) in core_idx:
                handles.append(m.register_forward_hook(on_core, with_kwargs=True))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(on_linear))
        for m, d_in, d_out in _tied_projections(model):
            if id(m) not in covered:
                handles.append(m.register_forward_hook(tied(d_in, d_out)))
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()

    densities = []
    for i, c in enumerate(cores):
        d = None
        if callable(getattr(c, "density", None)):
            d = c.density()
        elif core_calls[i]:
            d = core_flops[i] / core_dense[i] if core_dense[i] > 0 else None
        densities.append(None if d is None else float(d))

    fracs = []
    for f in getattr(method, "ffns", None) or []:
        i = rep_idx.get(id(f))
        fracs.append(sum(rep_frac[i]) / len(rep_frac[i]) if i is not None and rep_frac[i] else 1.0)
    attn, lin, rep = sum(core_flops), linear[0], sum(rep_flops)
    total = attn + lin + rep
    out = {
        "flops_per_token": total / n_tokens,
        "attention_flops_per_token": attn / n_tokens,
        "linear_flops_per_token": lin / n_tokens,
        "reported_flops_per_token": rep / n_tokens,
        "forward_flops": total,
        "n_tokens": int(n_tokens),
        "attention_density_by_layer": densities,
        "attention_flops_by_layer": [f / n_tokens for f in core_flops],
        "attention_count_by_layer": [("core" if type(c).flops is not AttentionCore.flops else "all_pairs")
                                     for c in cores],
        "ffn_executed_fraction": float(sum(fracs) / len(fracs)) if fracs else 1.0,
        **count_params(model),
        "counting": COUNTING,
    }
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"forward_cost: {k} is {v} (a core's flops() or a module's last_cost() is not finite)")
    return out

"""DSTI: Dynamic Sparsified Transformer Inference (D2DMoE v1; spec ``shared/specs/dsti.md``, issue 13).

A dense ReLU Transformer becomes an input-adaptive Mixture-of-Experts at inference, without retraining the backbone
from scratch. One registered method, ``dsti``, runs the whole protocol as stages (``bench/stages.py``):

0. ``relu_finetune`` (Train; only when the backbone is not ReLU): MiniLM-L6 is GELU and the authors' ReLU-BERT
   (continued pre-training) cannot be had, so the FFN activation is swapped for ReLU and the model is fine-tuned on
   the task (named deviation ``relu=swap``). ``relu_dense_eval`` (Compute) records the ReLU-dense dev/test metrics
   and the fraction of exactly-zero FFN activations per layer, so the cost of the swap is visible next to ``dense``.
1. ``sparsity_finetune`` (Train): task loss + ``alpha * mean_layers mean_tokens sum_i a_i`` (the l1 of the ReLU FFN
   activations, padding tokens included as the reference; ``penalty=hoyer``: squared Hoyer). ``sparsity_eval``
   (Compute) measures activation sparsity after it.
2. ``expert_split`` (Compute, cached): per layer, balanced k-means (``balanced_kmeans``: our numpy/scipy solver of
   KMeansConstrained's problem, no ortools; k-means++ seeding, exact equal-size assignment steps) of the
   unit-normalised rows of W1 into E experts of exactly n_e = d_ff / E neurons (MoEfication's parameter clustering;
   ``split=random``: the ablation). The split is a permutation of the hidden units stored as a buffer ``perm``: with
   every expert executed the MoE layer *is* the dense FFN (spec U1).
3. ``router_train`` (Train, backbone frozen, eval-mode backbone: no dropout): per layer a router
   ``g(x) = |W_b relu(W_a x + c_a) + c_b|`` (width 128) regresses (MSE) the l1 mass of each expert's hidden
   activations divided by its max over the batch (DSTI v1 target); all experts execute (dense) to produce targets.
4. ``tau`` (Sweep): dynamic-k inference, per token and layer: DYN-CUM (keep the most important experts until a
   fraction tau of the predicted mass is covered; default) and DYN-MAX (keep ``r_e >= (1 - tau) max r``) over the
   spec's grids. Executed experts run through ``kernels.moe_ffn`` (Triton on CUDA, its torch reference on CPU) with
   unit weights and b2 once. Each point's facts: executed-expert fraction and FLOPs per layer (``moe_ffn_flops`` +
   the router), relative FLOPs of the FFNs and of the whole model (spec §2.7: routers included, padding counted as
   the reference; valid-token numbers beside), and a histogram of executed experts per token per layer.

``pipeline=moefication`` is the MoEfication baseline: the same ReLU stage, no sparsity fine-tune, the same split,
BCE-with-logits routers (tanh hidden, identity output) and a static top-k sweep. ``profile=d2dmoe`` switches the
defaults to the NeurIPS version (squared Hoyer penalty, l2-of-output targets without normalisation).

Selection rules (``select_experts``), ties broken towards the lower expert index (stable sort):
- ``dyn_cum``, tau in (0, 1]: ``p = r / sum(r)`` (the research code's normalisation, spec pitfall 3; a row whose
  predicted mass is 0 is treated as uniform), sorted descending; expert kept iff the cumulative share before it is
  < tau and its share is > 0; the top expert is always kept. tau = 1: every expert with a non-zero share.
- ``dyn_max``, tau in [0, 1]: keep e iff ``r_e >= (1 - tau) * max r`` (all experts tied at the max are kept; an
  all-zero row keeps every expert). tau = 1: all experts.
- ``topk``, k in 1..E: the k largest.

Cost (``last_cost()``, for ``bench/cost.py``): the FFN's FLOPs of its last forward in the ``kernels.moe_ffn``
convention (``4 d n_e + n_e`` per executed pair, ``d`` per token for b2) plus the router's
(``2 d w + 2 w E`` and biases per token), and the executed-expert fraction. Per operating point the sweep also
measures FFN wall-clock time (``time_ffns``): the FFN inputs of the cost pass's first ``time_batches`` batches are
captured per layer (forward pre-hooks), then, after the pass, each layer's MoE forward as it runs at the point
(router, selection and ``kernels.moe_ffn``, ``DSTIFFN.moe_out``) and its dense forward (``fc2(relu(fc1 x))``, what
``dense`` mode computes: all experts as one matmul each) are timed on the same inputs with
``bench.measure.time_inference`` (a warm-up pass over the batches, then one pass timed with CUDA events), in one
process, under the trainer's autocast. Facts ``ffn_ms_moe``, ``ffn_ms_dense``, ``ffn_time_ratio`` (moe / dense),
per layer and summed over layers; None ("not measured") on CPU, where timings are no performance numbers, unless
``time_on_cpu`` (tests only), and when ``time_batches=0``. Timing runs after the counting pass and touches no
counter: a point's metrics and FLOP facts are the same with or without it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.attention import masked_sdpa
from bench.errors import BenchError
from bench.method import AttentionCore, AttentionSpec, FFNSpec, Method, MethodContext
from bench.registry import register_method
from kernels.moe_ffn import moe_ffn, moe_ffn_flops

RULES = ("dyn_cum", "dyn_max", "topk")
# spec §2.6: BERT grid for DYN-CUM; the NeurIPS (ViT) grid for DYN-MAX; MoEfication's k grid
TAU_GRID = {
    "dyn_cum": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
    "dyn_max": (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0),
}
K_GRID = (1, 2, 4, 8, 16, 32, 64, 96, 128)
PROFILES = {  # spec pitfall 1: (penalty, router target, target normalisation)
    "dsti_v1": ("l1", "intermediate_l1", "batch_max"),
    "d2dmoe": ("hoyer", "output_l2", "none"),
}
DEFAULT_EXPERTS = 128  # spec §2.1 (BERT-base: 128 experts of 24 neurons)


# ---- configuration -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DSTIConfig:
    profile: str = "dsti_v1"  # dsti_v1 (this suite's default) | d2dmoe (NeurIPS defaults for auto fields)
    pipeline: str = "dsti"  # dsti | moefication (baseline: no sparsity stage, BCE routers, static top-k)
    relu: str = "swap"  # swap: GELU -> ReLU + task fine-tune (deviation: no ReLU-BERT) | native: backbone is ReLU
    relu_steps: int | None = None  # stage 0 steps; None = train.steps when swapping, 0 for a native ReLU backbone
    sparsity_steps: int | None = None  # stage 1 steps; None = train.steps (moefication: 0, no such stage)
    router_steps: int | None = None  # stage 3 steps; None = 2 x train.steps (spec: routers 10 epochs, fine-tune 5)
    penalty: str = "auto"  # auto (profile) | l1 | hoyer
    alpha: float = 1e-3  # sparsity_enforcement_weight (spec §2.3, [C-pkg] example)
    alpha_schedule: str = "constant"  # constant | linear (0 -> alpha over the stage) | linear_warmup (alpha at 50 %)
    n_experts: int = 0  # E; 0 = 128 when d_ff / 128 >= 4 neurons, else experts of 8 neurons (tiny models)
    expert_size: int = 0  # n_e instead of E (E = d_ff / expert_size), e.g. 24 as BERT-base's experts
    split: str = "kmeans"  # kmeans (balanced k-means of normalised W1 rows) | random (ablation)
    kmeans_n_init: int = 10  # restarts; 10 and 300 are KMeansConstrained's defaults (the solver is ours,
    kmeans_max_iter: int = 300  # balanced_kmeans: k-means++ seeded from split_seed; tol 1e-4 as sklearn)
    split_seed: int = 0
    split_workers: int = 0  # processes for the per-layer clustering (0 = one per layer, up to the CPU count)
    router_width: int = 128  # w (spec §2.5)
    router_bias: bool = True  # True: the package (by DSTI's first author); False: the research code's default
    router_target: str = "auto"  # auto (profile) | intermediate_l1 (DSTI) | output_l2 (D2DMoE)
    router_target_norm: str = "auto"  # auto (profile) | batch_max | none
    router_loss: str = "auto"  # auto: mse (dsti), bce (moefication) | mse | bce
    router_lr: float = 1e-3
    rules: tuple[str, ...] = ()  # sweep rules; () = dyn_cum, dyn_max (dsti) or topk (moefication)
    taus: tuple[float, ...] = ()  # thresholds for the dyn rules; () = the spec's grid per rule
    ks: tuple[int, ...] = ()  # top-k values; () = 1, 2, 4, ..., 128 up to E
    cost_split: str = "test"  # split each sweep point's cost facts are counted on
    cost_batches: int = 0  # batches of it (0 = all)
    kernel: str = "auto"  # kernels.moe_ffn backend at inference: auto (triton on CUDA) | triton | torch
    time_batches: int = 4  # cost-split batches whose FFN inputs are timed per point (MoE vs dense FFN); 0 = off
    time_on_cpu: bool = False  # tests only: time on CPU too (CPU timings are not performance numbers)

    def validate(self):
        def choice(name, valid):
            v = getattr(self, name)
            if v not in valid:
                raise BenchError(f"dsti: {name}={v!r}; valid: {', '.join(valid)} (pass dsti.{name}=<one of them>)")

        choice("profile", tuple(PROFILES))
        choice("pipeline", ("dsti", "moefication"))
        choice("relu", ("swap", "native"))
        choice("penalty", ("auto", "l1", "hoyer"))
        choice("alpha_schedule", ("constant", "linear", "linear_warmup"))
        choice("split", ("kmeans", "random"))
        choice("router_target", ("auto", "intermediate_l1", "output_l2"))
        choice("router_target_norm", ("auto", "batch_max", "none"))
        choice("router_loss", ("auto", "mse", "bce"))
        choice("kernel", ("auto", "triton", "torch"))
        choice("cost_split", ("dev", "test"))
        if not (self.alpha >= 0):
            raise BenchError(f"dsti: alpha={self.alpha}; expected >= 0 (pass dsti.alpha=1e-3)")
        if self.n_experts and self.expert_size:
            raise BenchError("dsti: set n_experts or expert_size, not both (pass dsti.expert_size=0)")
        if self.time_batches < 0:
            raise BenchError(f"dsti: time_batches={self.time_batches}; expected >= 0 (0 = no FFN timing; pass "
                             f"dsti.time_batches=4)")
        if self.router_width < 1:
            raise BenchError("dsti: router_width must be >= 1 (pass dsti.router_width=128)")
        for r in self.rules:
            if r not in RULES:
                raise BenchError(f"dsti: rules has {r!r}; valid: {', '.join(RULES)} (e.g. dsti.rules=dyn_cum,dyn_max)")
        for r in self.sweep_rules():
            if r in TAU_GRID:
                for t in self.taus:
                    check_tau(r, t)
        for k in self.ks:
            if k < 1:
                raise BenchError(f"dsti: ks has {k}; expected integers >= 1 (e.g. dsti.ks=1,2,4)")

    def __post_init__(self):
        self.validate()

    # resolved settings
    def resolved_penalty(self) -> str:
        return PROFILES[self.profile][0] if self.penalty == "auto" else self.penalty

    def resolved_target(self) -> str:
        return PROFILES[self.profile][1] if self.router_target == "auto" else self.router_target

    def resolved_target_norm(self) -> str:
        return PROFILES[self.profile][2] if self.router_target_norm == "auto" else self.router_target_norm

    def resolved_router_loss(self) -> str:
        if self.router_loss != "auto":
            return self.router_loss
        return "bce" if self.pipeline == "moefication" else "mse"

    def sweep_rules(self) -> tuple[str, ...]:
        if self.rules:
            return tuple(self.rules)
        return ("topk",) if self.pipeline == "moefication" else ("dyn_cum", "dyn_max")


def check_tau(rule: str, tau: float) -> None:
    """One-line BenchError if ``tau`` is outside the rule's range: dyn_cum (0, 1], dyn_max [0, 1]."""
    ok = (0.0 < tau <= 1.0) if rule == "dyn_cum" else (0.0 <= tau <= 1.0)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and ok):
        rng = "(0, 1]" if rule == "dyn_cum" else "[0, 1]"
        raise BenchError(f"dsti: tau={tau!r} for rule {rule}; expected tau in {rng} (e.g. dsti.taus=0.5,0.9)")


def resolve_experts(cfg: DSTIConfig, d_ff: int) -> int:
    """E for an FFN of width ``d_ff`` (config section comment); a BenchError if it does not divide d_ff."""
    if cfg.expert_size:
        if d_ff % cfg.expert_size:
            raise BenchError(f"dsti: expert_size={cfg.expert_size} does not divide d_ff={d_ff}; pass a divisor "
                             f"(e.g. dsti.expert_size={_divisor_near(d_ff, cfg.expert_size)})")
        return d_ff // cfg.expert_size
    if cfg.n_experts:
        if d_ff % cfg.n_experts:
            raise BenchError(f"dsti: n_experts={cfg.n_experts} does not divide d_ff={d_ff}; pass a divisor "
                             f"(e.g. dsti.n_experts={_divisor_near(d_ff, cfg.n_experts)})")
        return cfg.n_experts
    if d_ff % DEFAULT_EXPERTS == 0 and d_ff // DEFAULT_EXPERTS >= 4:
        return DEFAULT_EXPERTS
    if d_ff % 8 == 0:
        return d_ff // 8
    raise BenchError(f"dsti: cannot pick an expert count for d_ff={d_ff}; pass dsti.n_experts=<a divisor of {d_ff}>")


def _divisor_near(n: int, x: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - x), d))


# ---- selection rules -----------------------------------------------------------------------------------------
def select_experts(r: torch.Tensor, rule: str, tau: float) -> torch.Tensor:
    """Bool selection (..., E) from router outputs ``r >= 0`` (..., E) (module docstring; ties -> lower index)."""
    E = r.shape[-1]
    r = r.float()
    if rule == "topk":
        k = int(tau)
        if not 1 <= k <= E:
            raise BenchError(f"dsti: top-k k={tau!r} with {E} experts; expected 1 <= k <= {E} (e.g. dsti.ks=1,2,4)")
        idx = torch.sort(r, dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.zeros(r.shape, dtype=torch.bool, device=r.device).scatter_(-1, idx, True)
    check_tau(rule, tau)
    r = r.clamp_min(0)
    if rule == "dyn_max":
        return r >= (1.0 - tau) * r.amax(-1, keepdim=True)
    # dyn_cum
    total = r.sum(-1, keepdim=True)
    p = torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), torch.full_like(r, 1.0 / E))
    ps, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ps, -1) - ps  # share covered before each expert (in sorted order)
    keep = (ps > 0) if tau >= 1.0 else (before < tau) & (ps > 0)
    keep[..., 0] = True  # the top expert is always kept
    return torch.zeros(r.shape, dtype=torch.bool, device=r.device).scatter_(-1, order, keep)


# ---- expert split (stage 2) ----------------------------------------------------------------------------------
# Balanced k-means, our solver (in the place of KMeansConstrained(size_min=size_max=n_e), whose min-cost flow needs
# ortools): k-means++ seeding, Lloyd iterations whose assignment step is the exact min-cost assignment of the points
# to clusters of exactly n_e members, centres the members' means.
SPLIT_NOTE = ("balanced k-means solved with scipy linear_sum_assignment (exact assignment under equal sizes, as "
              "KMeansConstrained's min-cost flow; ours costs squared distances, the k-means objective, where "
              "KMeansConstrained costs Euclidean distances rounded to 1e-3); k-means++ init; later Lloyd steps "
              "warm-started by cancelling negative exchange cycles, the solver when that does not settle")


def _sq_dists(X: np.ndarray, x2: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n, k) of the rows of X (squared norms ``x2``) to the rows of C:
    ``||x||^2 - 2 x c^T + ||c||^2``, clipped at 0."""
    D = X @ C.T
    D *= -2.0
    D += x2[:, None]
    D += np.einsum("ij,ij->i", C, C)[None, :]
    return np.maximum(D, 0.0, out=D)


def _kmeans_pp(X: np.ndarray, x2: np.ndarray, gram: np.ndarray | None, k: int,
               rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding as sklearn's (KMeansConstrained's): the first centre uniform, then per centre
    ``2 + int(log k)`` candidates drawn with probability ~ D^2 and the one lowering the potential most kept.
    ``gram`` (X X^T, optional) turns every distance to candidate points into a gather."""
    n = X.shape[0]
    trials = 2 + int(np.log(k))

    def dists(idx):
        if gram is None:
            return _sq_dists(X, x2, X[idx])
        return np.maximum(x2[:, None] - 2.0 * gram[idx].T + x2[idx][None, :], 0.0)

    idx = np.empty(k, dtype=np.int64)
    idx[0] = rng.integers(n)
    closest = dists(idx[:1])[:, 0]
    for c in range(1, k):
        cum = np.cumsum(closest)
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), n - 1)
        d = np.minimum(dists(cand), closest[:, None])
        best = int(np.argmin(d.sum(0)))
        idx[c], closest = cand[best], d[:, best]
    return X[idx].copy()


def _balanced_assign(D: np.ndarray, n_e: int) -> np.ndarray:
    """The exact min-cost assignment (labels) of the n = k * n_e points to k clusters of exactly n_e members, costs
    D (n, k): a linear sum assignment on the (n, n) matrix repeating each cluster's column n_e times (the problem
    KMeansConstrained solves as a min-cost flow). No solver when every point's nearest centre gives equal sizes."""
    nearest = D.argmin(1)
    if np.bincount(nearest, minlength=D.shape[1]).max() == n_e:
        return nearest
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(np.repeat(D, n_e, axis=1))
    return cols // n_e


def _negative_cycle(W: np.ndarray, eps: float):
    """A cycle of clusters ``[a0, a1, ..., a_m]`` (edges a_i -> a_i+1 -> a0) of weight < -eps in the complete graph
    of edge weights W (k, k); None when there is none (Bellman-Ford from a virtual source settles: every edge then
    has reduced cost >= -eps); False when undecided (the caller falls back to the exact solver)."""
    k = len(W)
    dist, pred, cols = np.zeros(k), np.full(k, -1), np.arange(k)
    for _ in range(k + 1):
        cand = dist[:, None] + W
        arg = cand.argmin(0)
        m = cand[arg, cols]
        upd = m < dist - eps
        if not upd.any():
            return None
        dist[upd], pred[upd] = m[upd], arg[upd]
        u, seen, path = int(np.flatnonzero(upd)[0]), {}, []
        while u != -1 and u not in seen:  # a cycle among the predecessors is a negative cycle
            seen[u] = len(path)
            path.append(u)
            u = int(pred[u])
        if u != -1:
            cyc = path[seen[u]:][::-1]  # pred[x] -> x, forwards
            if sum(W[a, b] for a, b in zip(cyc, cyc[1:] + cyc[:1])) < -eps:
                return cyc
            return False
    return False


def _cycle_cancel(D: np.ndarray, labels: np.ndarray, n_e: int, max_cycles: int = 32, eps: float = 1e-10):
    """Warm start of the assignment step from balanced ``labels``: an equal-size assignment is optimal iff no cyclic
    exchange (one point moving along each edge a -> b of a cycle of clusters, sizes kept) lowers the cost, i.e. iff
    the cluster graph ``W[a, b] = min_{x in a} D[x, b] - D[x, a]`` has no negative cycle (the residual graph of the
    min-cost flow). Cancels such cycles; returns (labels, True) once there is none (optimal), (labels, False) when
    ``max_cycles`` did not settle it or the search was undecided."""
    n, k = D.shape
    labels = labels.copy()
    for cancelled in range(max_cycles + 1):
        order = np.argsort(labels, kind="stable")  # cluster a's members: order[a*n_e:(a+1)*n_e]
        G = (D[order] - D[order, labels[order]][:, None]).reshape(k, n_e, k)
        arg = G.argmin(1)  # (k, k): the member of a cheapest to move to b
        W = np.take_along_axis(G, arg[:, None, :], 1)[:, 0]
        cyc = _negative_cycle(W, eps)
        if cyc is None:
            return labels, True
        if cyc is False or cancelled == max_cycles:
            return labels, False
        for a, b in zip(cyc, cyc[1:] + cyc[:1]):
            labels[order[a * n_e + arg[a, b]]] = b
    return labels, False


def _centres(X: np.ndarray, labels: np.ndarray, k: int, n_e: int) -> np.ndarray:
    return X[np.argsort(labels, kind="stable")].reshape(k, n_e, X.shape[1]).mean(1)


def _balanced_kmeans_single(X, x2, gram, k, n_e, rng, max_iter, tol):
    def assign(D, prev):
        if prev is not None:
            labels, optimal = _cycle_cancel(D, prev, n_e)
            if optimal:
                return labels
        return _balanced_assign(D, n_e)

    C = _kmeans_pp(X, x2, gram, k, rng)
    D = _sq_dists(X, x2, C)
    labels, shift, it = None, np.inf, 0
    for it in range(1, max_iter + 1):
        new = assign(D, labels)
        if labels is not None and np.array_equal(new, labels):
            shift = 0.0  # the assignment stopped changing: C is its members' means already
            break
        labels = new
        C_new = _centres(X, labels, k, n_e)
        shift = float(((C_new - C) ** 2).sum())
        C = C_new
        D = _sq_dists(X, x2, C)
        if shift <= tol:
            break
    if shift > 0:
        labels = assign(D, labels)  # as KMeansConstrained: the final labels are the assignment to the final centres
    return labels, float(D[np.arange(len(labels)), labels].sum()), it


def balanced_kmeans(X: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 10, max_iter: int = 300,
                    tol: float = 1e-4) -> tuple[np.ndarray, float, int]:
    """Balanced k-means of the rows of X (n, d) into ``n_clusters`` clusters of exactly n / n_clusters rows.
    ``n_init`` restarts (sub-seeds drawn from ``np.random.default_rng(seed)``), each: k-means++ seeding, Lloyd
    iterations (at most ``max_iter``) alternating the exact equal-size assignment for squared distances (the first by
    ``scipy.optimize.linear_sum_assignment``, later ones warm-started by ``_cycle_cancel``, the solver when that does
    not settle) and the members' means; stops as sklearn when the centres' squared shift is <= tol x the mean
    per-feature variance of X, or when the assignment no longer changes. Returns (labels, inertia, Lloyd
    iterations) of the restart of lowest inertia (the first on ties)."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    n = X.shape[0]
    if n_clusters < 1 or n % n_clusters:
        raise BenchError(f"dsti: balanced k-means of {n} rows into {n_clusters} clusters of equal size is impossible; "
                         f"pass a divisor of {n} as dsti.n_experts")
    n_e = n // n_clusters
    if n_clusters == 1 or n_e == 1:
        labels = np.zeros(n, np.int64) if n_clusters == 1 else np.arange(n, dtype=np.int64)
        return labels, float(((X - X.mean(0)) ** 2).sum()) if n_clusters == 1 else 0.0, 0
    x2 = np.einsum("ij,ij->i", X, X)
    gram = X @ X.T if n <= 8192 else None  # k-means++ distances to candidate rows, shared by the restarts
    tol_abs = tol * float(np.mean(np.var(X, axis=0)))
    best = None
    for s in np.random.default_rng(seed).integers(0, 2 ** 63 - 1, size=max(1, n_init)):
        res = _balanced_kmeans_single(X, x2, gram, n_clusters, n_e, np.random.default_rng(int(s)), max_iter, tol_abs)
        if best is None or res[1] < best[1]:
            best = res
    return np.asarray(best[0], dtype=np.int64), best[1], best[2]


def expert_perm(W1: torch.Tensor, n_experts: int, split: str = "kmeans", seed: int = 0, n_init: int = 10,
                max_iter: int = 300) -> torch.Tensor:
    """A permutation of the d_ff hidden units: expert e owns ``perm[e*n_e:(e+1)*n_e]`` (ascending inside).
    ``kmeans``: ``balanced_kmeans`` (E clusters of exactly n_e; KMeansConstrained(n_clusters=E,
    size_min=size_max=n_e)'s problem, our solver) of the unit-normalised rows of W1 (d_ff, d) (spec §2.4); cluster
    ids are ordered by their smallest unit. ``random``: a seeded permutation."""
    d_ff = W1.shape[0]
    if d_ff % n_experts:
        raise BenchError(f"dsti: n_experts={n_experts} does not divide d_ff={d_ff}; pass a divisor as dsti.n_experts")
    n_e = d_ff // n_experts
    if split == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(d_ff, generator=g)
    X = W1.detach().double().cpu().numpy()
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    if n_experts == 1:
        labels = np.zeros(d_ff, dtype=np.int64)
    elif n_e == 1:
        labels = np.arange(d_ff)
    else:
        labels = balanced_kmeans(X, n_experts, seed=seed, n_init=n_init, max_iter=max_iter)[0]
    return perm_from_labels(labels, n_experts)


def _perm_job(job) -> torch.Tensor:
    W1, E, split, seed, n_init, max_iter = job
    return expert_perm(torch.from_numpy(W1), E, split, seed, n_init, max_iter)


def perm_from_labels(labels: np.ndarray, n_experts: int) -> torch.Tensor:
    """Cluster labels (d_ff,) with equal cluster sizes -> the permutation (clusters ordered by first unit)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_experts)
    if len(counts) != n_experts or counts.min() != counts.max():
        raise BenchError(f"dsti: the expert split is unbalanced (sizes {counts.min()}..{counts.max()}); "
                         f"rerun the split (delete its cached artifact)")
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(n_experts)])
    rank = np.empty(n_experts, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_experts)
    return torch.from_numpy(np.lexsort((np.arange(len(labels)), rank[labels])).astype(np.int64))


# ---- modules ---------------------------------------------------------------------------------------------------
class DenseCore(AttentionCore):
    """Plain dense softmax attention (SDPA with key padding: the ``dense`` baseline's path, bench/attention.py)."""

    def forward(self, q, k, v, key_padding_mask=None):
        return masked_sdpa(q, k, v, key_padding_mask, self.spec.causal)


class Router(nn.Module):
    """``|W_b relu(W_a x + c_a) + c_b|`` (DSTI, spec §2.5) or MoEfication's ``W_b tanh(W_a x + c_a) + c_b`` logits."""

    def __init__(self, d_model: int, n_experts: int, width: int, bias: bool, kind: str = "mse"):
        super().__init__()
        self.kind = kind
        self.fc_a = nn.Linear(d_model, width, bias=bias)
        self.fc_b = nn.Linear(width, n_experts, bias=bias)

    def forward(self, x):
        if self.kind == "bce":
            return self.fc_b(torch.tanh(self.fc_a(x)))
        return self.fc_b(F.relu(self.fc_a(x))).abs()

    def flops(self, tokens: int) -> int:
        """``2 d w + 2 w E`` per token (bench/cost.py's Linear convention: bias adds not counted)."""
        d, w, E = self.fc_a.in_features, self.fc_a.out_features, self.fc_b.out_features
        return tokens * (2 * d * w + 2 * w * E)


class DSTIFFN(nn.Module):
    """The backbone's FFN (its own fc1/fc2, ReLU) with a router and an expert split; ``mode`` says what runs:

    - ``dense``: ``fc2(relu(fc1(x)))``; when ``penalty`` is set and training, the sparsity term of this forward is
      appended to ``penalties``; when ``stats`` is a dict, zero counts are accumulated into it.
    - ``router_train``: dense output; the router's loss against the per-expert targets is appended to ``router_losses``.
    - ``moe``: the router picks experts with ``rule``/``tau``; ``kernels.moe_ffn`` executes them.
    """

    def __init__(self, spec: FFNSpec, default: nn.Module, n_experts: int, cfg: DSTIConfig, act: nn.Module):
        super().__init__()
        self.spec = spec
        self.fc1, self.fc2, self.act = default.fc1, default.fc2, act
        self.d_model, self.d_ff = default.fc1.in_features, default.fc1.out_features
        self.n_experts, self.expert_size = n_experts, self.d_ff // n_experts
        self.router = Router(self.d_model, n_experts, cfg.router_width, cfg.router_bias, cfg.resolved_router_loss())
        self.register_buffer("perm", torch.arange(self.d_ff))  # expert e owns perm[e*n_e:(e+1)*n_e]
        self.target, self.target_norm = cfg.resolved_target(), cfg.resolved_target_norm()
        self.backend = cfg.kernel
        self.mode, self.rule, self.tau = "dense", "dyn_cum", 1.0
        self.penalty: str | None = None
        self.penalties: list[torch.Tensor] = []
        self.router_losses: list[torch.Tensor] = []
        self.stats: dict | None = None  # accumulators for a measuring pass (set by the method)
        self.token_mask: torch.Tensor | None = None  # (B, L) bool of the measured batch (valid-token counts)
        self._cost = {"flops": 0.0, "executed_fraction": 1.0}
        self._wcache: tuple = ()

    # -- helpers
    def dense_flops(self, tokens: int) -> int:
        return tokens * (4 * self.d_model * self.d_ff + self.d_ff + self.d_model)

    def expert_view(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_ff) hidden in original unit order -> (..., E, n_e) in expert order."""
        return h.index_select(-1, self.perm).unflatten(-1, (self.n_experts, self.expert_size))

    def contributions(self, h: torch.Tensor) -> torch.Tensor:
        """Per-expert contribution (..., E) of hidden ``h`` (..., d_ff): l1 of its activations (DSTI) or l2 of
        its output ``h_e W2^e`` (D2DMoE), fp32."""
        he = self.expert_view(h.float())
        if self.target == "intermediate_l1":
            return he.abs().sum(-1)
        W2 = self.fc2.weight.float().index_select(1, self.perm).unflatten(1, (self.n_experts, self.expert_size))
        out = []
        for e0 in range(0, self.n_experts, 16):  # chunks of experts: (T, 16, d) at a time
            out.append(torch.einsum("...en,den->...ed", he[..., e0:e0 + 16, :], W2[:, e0:e0 + 16]).norm(dim=-1))
        return torch.cat(out, -1)

    def router_targets(self, h: torch.Tensor) -> torch.Tensor:
        y = self.contributions(h)
        if self.target_norm == "batch_max":  # over every token and expert of the batch (spec pitfall 4)
            y = y / y.amax().clamp_min(1e-12)
        return y

    def _expert_weights(self, dtype, device):
        key = (dtype, device, self.perm._version, self.perm.data_ptr(), self.fc1.weight._version,
               self.fc1.weight.data_ptr(), self.fc1.bias._version, self.fc2.weight._version,
               self.fc2.weight.data_ptr(), self.fc2.bias._version)
        if not self._wcache or self._wcache[0] != key:
            with torch.no_grad():
                W1 = self.fc1.weight.index_select(0, self.perm).to(dtype).contiguous()
                b1 = self.fc1.bias.index_select(0, self.perm).to(dtype).contiguous()
                W2 = self.fc2.weight.index_select(1, self.perm).to(dtype).contiguous()
                b2 = self.fc2.bias.to(dtype).contiguous()
            self._wcache = (key, (W1, b1, W2, b2))
        return self._wcache[1]

    def last_cost(self) -> dict:
        """FLOPs of the last forward (kernels.moe_ffn convention, router included) and the executed fraction."""
        return dict(self._cost)

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if self.mode == "moe":
            return self._forward_moe(x, tokens)
        h = self.act(self.fc1(x))
        if self.mode == "router_train":
            with torch.no_grad():
                y_t = self.router_targets(h.detach())
            g = self.router(x.detach())
            if self.router.kind == "bce":
                loss = F.binary_cross_entropy_with_logits(g.float(), y_t)
            else:
                loss = F.mse_loss(g.float(), y_t)
            if torch.is_grad_enabled():
                self.router_losses.append(loss)
            if self.stats is not None:
                self._accumulate_router(g.detach(), y_t)
            self._cost = {"flops": float(self.dense_flops(tokens) + self.router.flops(tokens)),
                          "executed_fraction": 1.0}
        else:
            if self.penalty is not None and self.training and torch.is_grad_enabled():
                self.penalties.append(sparsity_penalty(h, self.penalty))
            self._cost = {"flops": float(self.dense_flops(tokens)), "executed_fraction": 1.0}
        if self.stats is not None:
            self._accumulate_zeros(h.detach())
        return self.fc2(h)

    def moe_out(self, x):
        """(y, sel): the MoE computation of ``moe`` mode (router, selection, ``kernels.moe_ffn``), no accounting."""
        r = self.router(x)
        sel = select_experts(r, self.rule, self.tau)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        W1, b1, W2, b2 = self._expert_weights(dtype, x.device)
        with torch.autocast(x.device.type, enabled=False):
            y = moe_ffn(x.to(dtype), W1, b1, W2, b2, sel, self.n_experts, backend=self.backend)
        return y, sel

    def dense_out(self, x):
        """The dense FFN (``dense`` mode's computation, all experts as one matmul each), no accounting."""
        return self.fc2(self.act(self.fc1(x)))

    def _forward_moe(self, x, tokens):
        y, sel = self.moe_out(x)
        f = moe_ffn_flops(sel, self.d_model, self.d_ff, self.n_experts)
        self._cost = {"flops": float(f["moe_flops"] + self.router.flops(tokens)),
                      "executed_fraction": f["pairs"] / max(1, tokens * self.n_experts)}
        if self.stats is not None:
            self._accumulate_sel(sel, f)
        return y

    # -- measuring-pass accumulators (all tokens, and valid tokens via token_mask)
    def _valid(self, shape_lead) -> torch.Tensor | None:
        m = self.token_mask
        if m is None or tuple(m.shape) != tuple(shape_lead):
            return None
        return m.bool()

    def _accumulate_zeros(self, h):
        st = self.stats
        z = (h == 0)
        st["zeros"] = st.get("zeros", 0) + int(z.sum())
        st["units"] = st.get("units", 0) + z.numel()
        v = self._valid(h.shape[:-1])
        if v is not None:
            st["zeros_valid"] = st.get("zeros_valid", 0) + int(z[v].sum())
            st["units_valid"] = st.get("units_valid", 0) + int(v.sum()) * h.shape[-1]

    def _accumulate_router(self, g, y):
        st = self.stats
        st.setdefault("pred", []).append(g.reshape(-1, self.n_experts)[:1024].float().cpu())
        st.setdefault("true", []).append(y.reshape(-1, self.n_experts)[:1024].float().cpu())

    def _accumulate_sel(self, sel, f):
        st = self.stats
        k = sel.reshape(-1, self.n_experts).sum(-1)
        st["tokens"] = st.get("tokens", 0) + f["tokens"]
        st["pairs"] = st.get("pairs", 0) + f["pairs"]
        st["moe_flops"] = st.get("moe_flops", 0) + f["moe_flops"]
        st["dense_flops"] = st.get("dense_flops", 0) + f["dense_flops"]
        st["router_flops"] = st.get("router_flops", 0) + self.router.flops(f["tokens"])
        hist = torch.bincount(k, minlength=self.n_experts + 1).cpu()
        st["hist"] = hist if "hist" not in st else st["hist"] + hist
        v = self._valid(sel.shape[:-1])
        if v is not None:
            kv = sel[v].sum(-1)
            st["tokens_valid"] = st.get("tokens_valid", 0) + int(v.sum())
            st["pairs_valid"] = st.get("pairs_valid", 0) + int(kv.sum())


def _router_param(name: str, param) -> bool:
    """Trainable in router_train: the routers only (the backbone is frozen)."""
    return ".router." in f".{name}"


def _moe_key(name: str) -> bool:
    return ".router." in f".{name}" or name.endswith(".perm")


def sparsity_penalty(h: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token l1 of the (non-negative) activations, or the squared Hoyer measure, averaged over all tokens."""
    h = h.float().reshape(-1, h.shape[-1])
    l1 = h.abs().sum(-1)
    if kind == "hoyer":
        return (l1 ** 2 / (h.pow(2).sum(-1) + 1e-15)).mean()
    return l1.mean()


# ---- the method ----------------------------------------------------------------------------------------------
@register_method("dsti")
class DSTI(Method):
    Config = DSTIConfig
    family = "ffn_sparsity"
    suites = ("glue",)

    def __init__(self, cfg, task=None):
        super().__init__(cfg, task)
        self.moe: list[DSTIFFN] = []
        self.stage_name = ""
        self._stage_start, self._stage_steps = 0, 1
        self.facts: dict[str, Any] = {}
        self.swapped: str | None = None  # the backbone activation replaced by ReLU
        self._moe_state: dict | None = None  # perm buffers and router weights at the end of router_train

    @classmethod
    def default_config(cls, ctx: MethodContext) -> DSTIConfig:
        return DSTIConfig()

    # ---- model hooks
    def make_attention(self, spec: AttentionSpec) -> AttentionCore:
        return DenseCore(spec)

    def make_ffn(self, spec: FFNSpec, default: nn.Module) -> nn.Module:
        cfg = self.cfg
        act = str(getattr(default, "activation", spec.activation)).lower()
        is_relu = act in ("relu", "relu()") or isinstance(getattr(default, "act", None), nn.ReLU)
        if not is_relu and cfg.relu == "native":
            raise BenchError(f"dsti: the backbone's FFN activation is {act}, not ReLU; DSTI needs ReLU FFNs: pass "
                             f"dsti.relu=swap (ReLU + a task fine-tune, the named deviation)")
        if not is_relu and cfg.relu_steps == 0:
            raise BenchError(f"dsti: the backbone's FFN activation is {act} and relu_steps=0 skips the ReLU stage; "
                             f"pass dsti.relu_steps>0 or leave it unset (= train.steps)")
        if not is_relu:
            self.swapped = act
        n_exp = resolve_experts(cfg, spec.d_ff)
        module = DSTIFFN(spec, default, n_exp, cfg, nn.ReLU() if not is_relu else default.act)
        self.moe.append(module)
        return module

    # ---- stages
    def _steps(self, trainer) -> dict:
        cfg, n = self.cfg, trainer.cfg.train.steps
        relu = cfg.relu_steps if cfg.relu_steps is not None else (n if self.swapped else 0)
        sparsity = cfg.sparsity_steps if cfg.sparsity_steps is not None else (0 if cfg.pipeline == "moefication" else n)
        if cfg.pipeline == "moefication" and cfg.sparsity_steps:
            raise BenchError("dsti: pipeline=moefication has no sparsity fine-tune; pass dsti.sparsity_steps=0")
        router = cfg.router_steps if cfg.router_steps is not None else 2 * n
        if relu + sparsity == 0:
            raise BenchError("dsti: no fine-tuning stage (relu_steps=0 and sparsity_steps=0); the task head would stay "
                             "untrained: pass dsti.sparsity_steps>0")
        if router < 1:
            raise BenchError("dsti: router_steps=0: the routers need training; pass dsti.router_steps>0")
        return {"relu": relu, "sparsity": sparsity, "router": router}

    def points(self) -> tuple:
        pts, E = [], min(m.n_experts for m in self.moe) if self.moe else DEFAULT_EXPERTS
        for rule in self.cfg.sweep_rules():
            if rule == "topk":
                ks = self.cfg.ks or tuple(k for k in K_GRID if k <= E)
                for k in ks:
                    if k > E:
                        raise BenchError(f"dsti: ks has {k} > n_experts={E}; pass k <= {E}")
                    pts.append({"rule": "topk", "k": int(k)})
            else:
                for t in (self.cfg.taus or TAU_GRID[rule]):
                    check_tau(rule, t)
                    pts.append({"rule": rule, "tau": float(t)})
        return tuple(pts)

    def stages(self, trainer) -> list:
        """relu_finetune, relu_dense_eval (when the activation is swapped), sparsity_finetune, sparsity_eval (dsti),
        expert_split, router_train, router_quality, then the tau (or k) sweep. The last fine-tune stage is the
        run's candidate: the record's test is that dense (all experts) model; the sweep runs the MoE."""
        from bench.stages import Compute, Sweep, Train

        cfg, st = self.cfg, self._steps(trainer)
        penalty = cfg.resolved_penalty()
        out = []
        if st["relu"]:
            out += [Train("relu_finetune", steps=st["relu"], keep_best=True, candidate=not st["sparsity"],
                          artifact="dense_checkpoint",
                          artifact_key={"activation": "relu", "from": self.swapped or "relu"}),
                    Compute("relu_dense_eval", fn=self._measure_dense, apply=self._store("relu_dense"),
                            artifact="activation_stats")]
        if st["sparsity"]:
            out += [Train("sparsity_finetune", steps=st["sparsity"], keep_best=True, candidate=True,
                          artifact="dense_checkpoint",
                          artifact_key={"activation": "relu", "penalty": penalty, "alpha": cfg.alpha,
                                        "alpha_schedule": cfg.alpha_schedule}),
                    Compute("sparsity_eval", fn=self._measure_dense, apply=self._store("sparse_dense"),
                            artifact="activation_stats")]
        out.append(Compute("expert_split", fn=self._split, apply=self._apply_split, artifact="expert_split",
                           artifact_key={"split": cfg.split, "n_experts": [m.n_experts for m in self.moe],
                                         "seed": cfg.split_seed, "n_init": cfg.kmeans_n_init,
                                         "max_iter": cfg.kmeans_max_iter}))
        out.append(Train("router_train", steps=st["router"], lr=cfg.router_lr, schedule="linear", warmup_steps=0,
                         trainable=_router_param, candidate=False, artifact="router_checkpoint",
                         artifact_key={"target": cfg.resolved_target(), "norm": cfg.resolved_target_norm(),
                                       "loss": cfg.resolved_router_loss(), "width": cfg.router_width,
                                       "bias": cfg.router_bias}))
        out.append(Compute("router_quality", fn=self._router_quality, apply=self._apply_router_quality,
                           artifact="router_quality"))
        out.append(Sweep("tau" if cfg.pipeline == "dsti" else "k", points=self.points(), apply=self._apply_point))
        return out

    def _store(self, key):
        def apply(trainer, payload):
            self.facts[key] = payload
        return apply

    def set_mode(self, mode: str, **kw) -> None:
        for m in self.moe:
            m.mode = mode
            for k, v in kw.items():
                setattr(m, k, v)

    # ---- hooks
    def on_stage_start(self, trainer, stage) -> None:
        self.stage_name = getattr(stage, "name", "")
        self._stage_start = trainer.step
        steps = getattr(stage, "steps", None)
        self._stage_steps = steps if isinstance(steps, int) and steps > 0 else trainer.cfg.train.steps
        if self.stage_name == "sparsity_finetune":
            self.set_mode("dense", penalty=self.cfg.resolved_penalty())
        elif self.stage_name == "relu_finetune":
            self.set_mode("dense", penalty=None)
        elif self.stage_name == "router_train":
            self.set_mode("router_train", penalty=None)

    def on_stage_end(self, trainer, stage) -> None:
        name = getattr(stage, "name", "")
        if name == "sparsity_finetune":
            self.set_mode("dense", penalty=None)
        if name == "router_train":
            # the Trainer reloads the candidate (pre-split) checkpoint after the stages: keep the split and the
            # trained routers to put back before the sweep (the backbone is that checkpoint's: frozen since)
            self._moe_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()
                               if _moe_key(k)}
        self.stage_name = ""

    def state_dict(self) -> dict:
        return {"moe_state": self._moe_state, "facts": self.facts}

    def load_state_dict(self, state: dict) -> None:
        self._moe_state = state.get("moe_state")
        self.facts.update(state.get("facts") or {})

    def restore_moe_state(self, trainer) -> None:
        if self._moe_state:
            missing = trainer.model.load_state_dict(self._moe_state, strict=False)
            if missing.unexpected_keys:
                raise BenchError(f"dsti: cannot restore the router/split state: {missing.unexpected_keys[:3]}")

    def before_step(self, trainer, step: int) -> None:
        for m in self.moe:
            m.penalties.clear()
            m.router_losses.clear()
        if self.stage_name == "router_train":  # frozen backbone runs in eval mode (no dropout), spec §2.5
            trainer.model.eval()

    def alpha_now(self, trainer) -> float:
        a, sched = self.cfg.alpha, self.cfg.alpha_schedule
        t = min(1.0, max(0.0, (trainer.step - self._stage_start) / max(1, self._stage_steps)))
        if sched == "linear":
            return a * t
        if sched == "linear_warmup":
            return a * min(1.0, t / 0.5)
        return a

    def loss(self, trainer, batch, task_loss, output):
        if self.stage_name == "router_train":
            losses = [l for m in self.moe for l in m.router_losses]
            for m in self.moe:
                m.router_losses.clear()
            if not losses:
                raise BenchError("dsti: router_train step produced no router loss (FFNs not in router_train mode)")
            return torch.stack(losses).mean()
        pens = [p for m in self.moe for p in m.penalties]
        for m in self.moe:
            m.penalties.clear()
        if self.stage_name == "sparsity_finetune" and pens:
            return task_loss + self.alpha_now(trainer) * torch.stack(pens).mean()
        return task_loss

    # ---- compute stages
    def _passes(self, trainer, split: str, max_batches: int):
        """Forward passes over ``split`` (no grad, eval mode, the trainer's autocast) setting each FFN's token mask."""
        task, model = trainer.task, trainer.model
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.autocast():
                for i, batch in enumerate(task.eval_batches(split)):
                    if max_batches and i >= max_batches:
                        break
                    batch = task.to_device(batch, device)
                    am = batch.get("attention_mask") if isinstance(batch, dict) else None
                    for m in self.moe:
                        m.token_mask = None if am is None else am.bool()
                    yield batch
        finally:
            for m in self.moe:
                m.token_mask = None
            model.train(was)

    def _measure_dense(self, trainer) -> dict:
        """Dev and test metrics of the dense ReLU model and its exactly-zero activation fraction per layer (dev)."""
        self.set_mode("dense", penalty=None)
        for m in self.moe:
            m.stats = {}
        try:
            for batch in self._passes(trainer, "dev", trainer.cfg.train.eval_batches):
                trainer.task.loss(trainer.model, batch)
            zf = [m.stats.get("zeros", 0) / max(1, m.stats.get("units", 0)) for m in self.moe]
            zv = [m.stats["zeros_valid"] / max(1, m.stats["units_valid"]) if "units_valid" in m.stats else None
                  for m in self.moe]
        finally:
            for m in self.moe:
                m.stats = None
        return {"dev": trainer.evaluate("dev"), "test": trainer.evaluate("test"),
                "zero_fraction": zf, "zero_fraction_valid": zv, "step": trainer.step}

    def _split(self, trainer) -> dict:
        """One clustering per layer, in parallel processes (each single-threaded: the result does not depend on
        the number of workers)."""
        t0 = time.perf_counter()
        cfg = self.cfg
        jobs = [(m.fc1.weight.detach().float().cpu().numpy(), m.n_experts, cfg.split, cfg.split_seed,
                 cfg.kmeans_n_init, cfg.kmeans_max_iter) for m in self.moe]
        workers = min(len(jobs), os.cpu_count() or 1, cfg.split_workers or len(jobs))
        if cfg.split == "kmeans" and workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                perms = list(pool.map(_perm_job, jobs))
        else:
            perms = [_perm_job(j) for j in jobs]
        return {"perms": perms, "split": self.cfg.split, "n_experts": [m.n_experts for m in self.moe],
                "seconds": time.perf_counter() - t0}

    def _apply_split(self, trainer, payload) -> None:
        perms = payload["perms"]
        if len(perms) != len(self.moe):
            raise BenchError(f"dsti: cached expert split has {len(perms)} layers, the model {len(self.moe)}; delete "
                             f"the expert_split artifact")
        for m, p in zip(self.moe, perms):
            p = torch.as_tensor(p, dtype=torch.long)
            if p.numel() != m.d_ff or not torch.equal(torch.sort(p).values, torch.arange(m.d_ff)):
                raise BenchError(f"dsti: cached expert split of layer {m.spec.layer} is not a permutation of "
                                 f"{m.d_ff} units; delete the expert_split artifact")
            with torch.no_grad():
                m.perm.copy_(p.to(m.perm.device))
        self.facts["split"] = {"split": payload["split"], "n_experts": payload["n_experts"],
                               "expert_size": [m.expert_size for m in self.moe],
                               "seconds": round(float(payload.get("seconds", 0.0)), 3)}

    def _router_quality(self, trainer) -> dict:
        """Spearman correlation of predicted vs true expert contributions per layer on dev (spec U6) and the
        router loss there."""
        from scipy.stats import spearmanr

        self.set_mode("router_train", penalty=None)
        for m in self.moe:
            m.stats = {}
        try:
            for i, batch in enumerate(self._passes(trainer, "dev", 8)):
                trainer.task.loss(trainer.model, batch)
            rho, mse = [], []
            for m in self.moe:
                p, t = torch.cat(m.stats["pred"]), torch.cat(m.stats["true"])
                s = spearmanr(p.reshape(-1).numpy(), t.reshape(-1).numpy()).statistic
                rho.append(None if not np.isfinite(s) else float(s))
                mse.append(float(F.mse_loss(p, t)))
        finally:
            for m in self.moe:
                m.stats = None
        return {"spearman": rho, "mse": mse}

    def _apply_router_quality(self, trainer, payload) -> None:
        self.facts["router_quality"] = payload
        self.set_mode("dense", penalty=None)  # the record's test / cost / throughput: all experts (dense)

    # ---- the operating-point sweep
    def _apply_point(self, trainer, point) -> dict:
        rule = point["rule"]
        tau = point["k"] if rule == "topk" else point["tau"]
        self.restore_moe_state(trainer)
        self.set_mode("moe", rule=rule, tau=tau, penalty=None)
        return self.measure_cost(trainer, self.cfg.cost_split, self.cfg.cost_batches, time_batches=self.cfg.time_batches)

    def measure_cost(self, trainer, split: str, max_batches: int = 0, time_batches: int = 0) -> dict:
        """One pass over ``split`` counting executed pairs per layer and every other FLOP of the model (Linear
        layers outside the FFNs, attention cores' ``flops``): spec §2.7's relative FLOPs, padding counted (as the
        reference) and over valid tokens. With ``time_batches`` the FFN inputs of that many first batches are
        captured and, after the pass, the FFNs timed on them (``time_ffns``; None facts where not measured)."""
        model = trainer.model
        device = next(model.parameters()).device
        timed = bool(time_batches) and (device.type == "cuda" or self.cfg.time_on_cpu)
        inputs: list[list[torch.Tensor]] = [[] for _ in self.moe]
        capture = {"on": False}
        ffn_mods = {id(x) for m in self.moe for x in m.modules()}
        rest = {"flops": 0}
        hooks = []

        def lin_hook(mod, args, out):
            x = args[0]
            t = x.numel() // x.shape[-1]
            rest["flops"] += t * 2 * mod.in_features * mod.out_features  # bench/cost.py: bias adds not counted

        def core_hook(mod, args, out):
            q, k = args[0], args[1]
            kpm = args[3] if len(args) > 3 else None
            rest["flops"] += float(mod.flops(q, k, kpm))

        def capture_hook(i):
            def hook(mod, args):
                if capture["on"]:
                    inputs[i].append(args[0].detach())
            return hook

        for mod in model.modules():
            if isinstance(mod, nn.Linear) and id(mod) not in ffn_mods:
                hooks.append(mod.register_forward_hook(lin_hook))
            elif isinstance(mod, AttentionCore):
                hooks.append(mod.register_forward_hook(core_hook))
        if timed:
            hooks += [m.register_forward_pre_hook(capture_hook(i)) for i, m in enumerate(self.moe)]
        for m in self.moe:
            m.stats = {}
        try:
            for i, batch in enumerate(self._passes(trainer, split, max_batches)):
                capture["on"] = timed and i < time_batches
                trainer.task.loss(model, batch)
            layers = [dict(m.stats) for m in self.moe]
        finally:
            for h in hooks:
                h.remove()
            for m in self.moe:
                m.stats = None
        facts = cost_facts(layers, [m.n_experts for m in self.moe], rest["flops"], split)
        timing = None
        if timed and all(inputs):
            was = model.training
            model.eval()
            try:
                timing = time_ffns(self.moe, inputs, device, trainer.autocast)
            finally:
                model.train(was)
        return add_timing(facts, timing, len(inputs[0]) if timed else 0)

    # ---- record
    def info(self) -> dict:
        cfg = self.cfg
        deviations = []
        if self.swapped:
            deviations.append(f"relu=swap: the backbone's {self.swapped} FFN activation replaced by ReLU and "
                              f"fine-tuned "
                              f"on the task (the authors continue pre-training a ReLU BERT; not available)")
        if self.moe and self.moe[0].expert_size != 24:
            deviations.append(f"expert size {self.moe[0].expert_size} (E={self.moe[0].n_experts}, d_ff="
                              f"{self.moe[0].d_ff}) vs BERT-base's 24 (E=128, d_ff=3072)")
        deviations.append("fine-tune stages use the task's budget and lr (spec: 5 epochs, lr 2e-5, batch 64); "
                          "routers 2x the task's steps (spec: 10 epochs), lr 1e-3")
        if cfg.penalty != "auto" or cfg.router_target != "auto" or cfg.router_target_norm != "auto":
            deviations.append("penalty/target set explicitly (not the profile's)")
        if cfg.split == "random":
            deviations.append("split=random (ablation)")
        out = {
            "profile": cfg.profile, "pipeline": cfg.pipeline, "relu": cfg.relu, "swapped_activation": self.swapped,
            "penalty": cfg.resolved_penalty(), "alpha": cfg.alpha, "alpha_schedule": cfg.alpha_schedule,
            "router_target": cfg.resolved_target(), "router_target_norm": cfg.resolved_target_norm(),
            "router_loss": cfg.resolved_router_loss(), "router_width": cfg.router_width, "router_bias": cfg.router_bias,
            "rules": list(cfg.sweep_rules()), "n_experts": [m.n_experts for m in self.moe],
            "expert_size": [m.expert_size for m in self.moe], "deviations": deviations,
            "cost_convention": "kernels.moe_ffn: 4*d*n_e + n_e per executed (token, expert) pair, d per token (b2); "
                               "router 2*d*w + 2*w*E; other Linears 2*in*out, attention cores their flops(); "
                               "padding tokens counted (spec 2.7), valid-token numbers beside",
        }
        if cfg.split == "kmeans":  # how the split is computed, not a deviation of the algorithm
            out["implementation_notes"] = [SPLIT_NOTE]
        out.update({k: v for k, v in self.facts.items()})
        return out

    @classmethod
    def report_section(cls, runs, ctx):
        return _report_section(runs, ctx)


def cost_facts(layers: list[dict], n_experts: list[int], rest_flops: float, split: str) -> dict:
    """Facts of one operating point from per-layer accumulators (``DSTIFFN._accumulate_sel``)."""
    per_layer = []
    moe_total = dense_total = router_total = 0
    pairs_v = tokens_v = 0
    for st, E in zip(layers, n_experts):
        tokens, pairs = st.get("tokens", 0), st.get("pairs", 0)
        moe_total += st.get("moe_flops", 0)
        dense_total += st.get("dense_flops", 0)
        router_total += st.get("router_flops", 0)
        pairs_v += st.get("pairs_valid", 0)
        tokens_v += st.get("tokens_valid", 0)
        hist = st["hist"].tolist() if "hist" in st else []
        per_layer.append({
            "executed_fraction": pairs / max(1, tokens * E),
            "executed_fraction_valid": (st["pairs_valid"] / max(1, st["tokens_valid"] * E)
                                        if "tokens_valid" in st else None),
            "mean_experts": pairs / max(1, tokens),
            "relative_ffn_flops": ((st.get("moe_flops", 0) + st.get("router_flops", 0))
                                   / max(1, st.get("dense_flops", 0))),
            "experts_histogram": hist,  # tokens executing k experts, k = 0..E
        })
    total_pairs = sum(st.get("pairs", 0) for st in layers)
    total_slots = sum(st.get("tokens", 0) * E for st, E in zip(layers, n_experts))
    slots_v = sum(st.get("tokens_valid", 0) * E for st, E in zip(layers, n_experts))
    dense_model = rest_flops + dense_total
    return {
        "split": split,
        "executed_fraction": total_pairs / max(1, total_slots),
        "executed_fraction_valid": pairs_v / slots_v if slots_v else None,
        "ffn_flops": moe_total + router_total, "router_flops": router_total, "dense_ffn_flops": dense_total,
        "rest_flops": rest_flops, "flops": rest_flops + moe_total + router_total, "dense_flops": dense_model,
        "relative_ffn_flops": (moe_total + router_total) / max(1, dense_total),
        "relative_flops": (rest_flops + moe_total + router_total) / max(1, dense_model),
        "ffn_share_dense": dense_total / max(1, dense_model),
        "per_layer": per_layer,
    }


def time_ffns(moe: list[DSTIFFN], inputs: list[list[torch.Tensor]], device: torch.device, autocast) -> list[dict]:
    """Per layer ``{"moe": ms, "dense": ms}``: ``DSTIFFN.moe_out`` (as the layer runs at its current point) and
    ``DSTIFFN.dense_out`` on the same captured inputs, each by ``bench.measure.time_inference`` (a warm-up pass over
    the batches, then one timed pass: CUDA events on CUDA), under ``autocast()`` (the trainer's), in one process."""
    from bench.measure import time_inference

    out = []
    with autocast():
        for m, xs in zip(moe, inputs):
            toks = [x.numel() // x.shape[-1] for x in xs]
            seqs = [x.shape[0] if x.dim() > 2 else 1 for x in xs]
            row = {}
            for name, fn in (("moe", lambda x, m=m: m.moe_out(x)), ("dense", lambda x, m=m: m.dense_out(x))):
                r = time_inference(fn, xs, device, toks, seqs)
                row[name] = sum(toks) / r["infer_tokens_per_s"] * 1e3  # ms of the timed pass
            out.append(row)
    return out


def add_timing(facts: dict, timing: list[dict] | None, batches: int) -> dict:
    """``ffn_ms_moe``, ``ffn_ms_dense``, ``ffn_time_ratio`` (moe / dense) into a point's facts, per layer and
    summed; None where not measured (``timing`` None: CPU or time_batches=0)."""
    facts["ffn_time_batches"] = batches if timing is not None else 0
    if timing is None:
        facts.update(ffn_ms_moe=None, ffn_ms_dense=None, ffn_time_ratio=None)
        for pl in facts["per_layer"]:
            pl.update(ffn_ms_moe=None, ffn_ms_dense=None, ffn_time_ratio=None)
        return facts
    for pl, t in zip(facts["per_layer"], timing):
        pl.update(ffn_ms_moe=t["moe"], ffn_ms_dense=t["dense"],
                  ffn_time_ratio=t["moe"] / t["dense"] if t["dense"] > 0 else None)
    moe_ms, dense_ms = sum(t["moe"] for t in timing), sum(t["dense"] for t in timing)
    facts.update(ffn_ms_moe=moe_ms, ffn_ms_dense=dense_ms, ffn_time_ratio=moe_ms / dense_ms if dense_ms > 0 else None)
    return facts


# ---- report section (``Method.report_section``): imports bench.report (pandas, matplotlib) only when called -----
_SECTION_INTRO = (
    "Per run: the test metric of the ReLU-dense model (after the GELU->ReLU swap and a task fine-tune, the named "
    "deviation `relu=swap`) and of the sparsity fine-tuned dense model (the record's test: all experts), the fraction "
    "of exactly-zero FFN activations after each (dev, padding included, mean over layers), and the router quality "
    "(Spearman of predicted vs true expert contributions, mean over layers). Operating points: the rule (dyn_cum: "
    "coverage tau of the predicted mass; dyn_max: r >= (1 - tau) max r; topk: MoEfication's static k), the executed "
    "expert fraction (padding counted, as the reference; valid tokens beside), FFN FLOPs (routers included) and "
    "whole-model FLOPs relative to the dense model (spec section 2.7), and the test metric. Plot against measured "
    "relative FLOPs, never tau (spec pitfall 2). FFN time / dense: the measured wall-clock time of the MoE FFNs "
    "(router, selection and kernels.moe_ffn, as run at the point) over that of the dense FFNs, measured per layer on "
    "the same captured FFN inputs (the first time_batches batches of the cost split), in one process (CUDA events "
    "after a warm-up), summed over layers; n/m: not measured (CPU runs). Per DSTI run, a figure of the FFN activation "
    "zeros per layer after each stage and of the experts executed per token, per layer, at DYN-CUM tau 0.9 (else the "
    "middle point by FLOPs).\n")


def _load_points(path) -> list[dict]:
    import json

    try:
        with open(path) as f:
            return json.load(f).get("operating_points") or []
    except (OSError, ValueError, TypeError):
        return []


def _mean(xs):
    xs = [x for x in (xs or []) if isinstance(x, (int, float)) and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def _report_section(s, ctx) -> tuple[list[str], list]:
    import pandas as pd
    from matplotlib.figure import Figure

    from bench import report as R

    mine = s.method.isin(ctx.methods)
    if not mine.any():
        return [], []
    md, written = ["### DSTI (dynamic-k MoE FFNs)\n", _SECTION_INTRO], []
    for task, t in s[s.task.isin(s[mine].task)].groupby("task", sort=True):
        main, hib = R._task_metric(t)
        md.append(f"#### {task}\n")
        rows, pts, curves = [], [], {}
        for r in t[mine.reindex(t.index, fill_value=False)].itertuples():
            info = r.info or {}
            relu, sp, rq = info.get("relu_dense") or {}, info.get("sparse_dense") or {}, info.get("router_quality") or {}
            rows.append({"run": r.label, "seed": r.seed, "pipeline": info.get("pipeline", R.NA),
                         "E x n_e": f"{(info.get('n_experts') or ['?'])[0]} x {(info.get('expert_size') or ['?'])[0]}",
                         f"ReLU-dense test {main}": R.fmt_num((relu.get("test") or {}).get(main), R.NA),
                         f"sparse-dense test {main}": R.fmt_num((r.metrics or {}).get(main), R.NA),
                         "zeros ReLU-dense": R.fmt_num(_mean(relu.get("zero_fraction")), R.NA),
                         "zeros after sparsity": R.fmt_num(_mean(sp.get("zero_fraction")), R.NA),
                         "router Spearman": R.fmt_num(_mean(rq.get("spearman")), R.NA)})
            for p in _load_points(r.path):
                pt, facts, m = p.get("point") or {}, p.get("facts") or {}, p.get("metrics") or {}
                rule = pt.get("rule", "?")
                thr = pt.get("k", pt.get("tau"))
                val = m.get(f"test_{main}", m.get(main))
                pts.append({"run": r.label, "seed": r.seed, "rule": rule, "tau / k": str(thr) if thr is not None else R.NA,  # exact: 0.9999 is not 1
                            "executed": R.fmt_num(facts.get("executed_fraction")),
                            "executed (valid)": R.fmt_num(facts.get("executed_fraction_valid"), R.NA),
                            "rel. FFN FLOPs": R.fmt_num(facts.get("relative_ffn_flops")),
                            "rel. FLOPs": R.fmt_num(facts.get("relative_flops")),
                            "FFN time / dense": R.fmt_num(facts.get("ffn_time_ratio"), R.NM),
                            f"test {main}": R.fmt_num(val)})
                if facts.get("relative_flops") is not None and val is not None:
                    curves.setdefault((r.label, r.seed, rule), []).append((facts["relative_flops"], val))
        md.append(R.md_table(pd.DataFrame(rows)))
        if pts:
            md.append(R.md_table(pd.DataFrame(pts)))
        if curves:
            fig = Figure(figsize=(5.5, 3.6), layout="constrained")
            ax = fig.subplots()
            for (label, seed, rule), xy in sorted(curves.items()):
                xy = sorted(xy)
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", ms=3, label=f"{label} s{seed} {rule}")
            for r in t[t.dense].itertuples():
                v = (r.metrics or {}).get(main)
                if v is not None:
                    ax.scatter([1.0], [v], marker="*", s=60, label=f"{r.label} s{r.seed}")
            ax.set_xlabel("relative FLOPs (whole model, dense = 1)")
            ax.set_ylabel(f"test {main}")
            ax.set_title(f"{task}: DSTI operating points", fontsize=9)
            ax.legend(fontsize=6)
            figs = ctx.save(fig, task, "dsti_quality_vs_flops")
            written += figs
            md.append(R.figure_links(figs))
        drawn = set()
        for r in t[mine.reindex(t.index, fill_value=False)].sort_values(["label", "seed", "path"]).itertuples():
            if (r.label, r.seed) in drawn:  # one figure per run name (a repeated run would overwrite the file)
                continue
            drawn.add((r.label, r.seed))
            figs = _experts_figure(r, task, ctx)
            if figs:
                written += figs
                md.append(R.figure_links(figs))
    return md, written


def _histogram_point(points: list[dict]) -> dict | None:
    """The operating point whose per-layer expert histograms are drawn: DYN-CUM at tau 0.9 (the spec's default)
    if the run has it, else its middle point by relative FLOPs."""
    have = [p for p in points if any("experts_histogram" in (l or {}) for l in (p.get("facts") or {}).get("per_layer") or [])]
    for p in have:
        if (p.get("point") or {}).get("rule") == "dyn_cum" and (p.get("point") or {}).get("tau") == 0.9:
            return p
    have.sort(key=lambda p: ((p.get("facts") or {}).get("relative_flops") or 0.0, _json_key(p.get("point"))))
    return have[len(have) // 2] if have else None


def _json_key(x) -> str:
    import json

    return json.dumps(x, sort_keys=True, default=str)


def _experts_figure(r, task, ctx) -> list:
    """One run: FFN activation zeros per layer after the ReLU stage and after the sparsity fine-tune (stage 1), and
    the histogram of experts executed per token, per layer, at one operating point."""
    from matplotlib.figure import Figure

    info = r.info or {}
    if info.get("pipeline") != "dsti":
        return []
    point = _histogram_point(_load_points(r.path))
    zeros = {name: (info.get(key) or {}).get("zero_fraction") for name, key in
             (("ReLU-dense", "relu_dense"), ("after sparsity fine-tune", "sparse_dense"))}
    zeros = {k: v for k, v in zeros.items() if v}
    if point is None and not zeros:
        return []
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    az, ah = fig.subplots(1, 2, width_ratios=[1, 2])
    for name, z in zeros.items():
        az.plot(range(len(z)), z, marker="o", ms=3, label=name)
    az.set_xlabel("layer")
    az.set_ylabel("zero FFN activations (dev)")
    az.set_ylim(0, 1)
    az.legend(fontsize=6)
    if point is not None:
        pt = point.get("point") or {}
        for i, layer in enumerate((point.get("facts") or {}).get("per_layer") or []):
            h = np.asarray(layer.get("experts_histogram") or [], dtype=float)
            if h.sum() > 0:
                ah.plot(np.arange(len(h)), h / h.sum(), lw=1, label=f"layer {i}")
        thr = pt.get("tau", pt.get("k"))
        ah.set_title(f"experts executed per token at {pt.get('rule', '?')} {thr} (padding counted)", fontsize=8)
        ah.set_xlabel("experts executed")
        ah.set_ylabel("fraction of tokens")
        ah.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{task}: {r.label} s{r.seed}", fontsize=9)
    return ctx.save(fig, task, r.label, f"s{r.seed}", "dsti_experts")

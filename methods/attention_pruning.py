"""Attention Pruning (AP): data-informed global masks per (layer, head) (spec ``attention_pruning.md``).

Protocol (``stages``), one task and seed:

1. ``Train("dense")``: the dense model (the dense baseline's SDPA path), cached as the ``dense_checkpoint``
   artifact with an empty ``artifact_key``, so every method declaring the same first stage shares it.
2. ``Compute("attention_stats")``: one pass over the **training split** (``task.eval_batches("train")``: in order,
   no shuffling), eval mode, no gradients; every core accumulates the mean post-softmax attention
   ``Ā[h, i, j]`` on its grid (R x C = the layer's ``max_len`` x ``max_len_kv``) with
   ``kernels.AttentionStatsAccumulator`` (no (B, H, L, L) tensor). Default counting ``count=row`` (spec §2.2
   "recommended"): sequences are grouped by their exact (query, key) lengths (right padding) and sliced to them, so
   padded queries add nothing and ``Cnt[i]`` = sequences whose query ``i`` is real: every observed row of Ā sums
   to 1. ``count=legacy_batch``: fairseq's padded-batch per-element count (padded queries included). Cached as the
   ``attention_stats`` artifact (keyed on the dense checkpoint; tau is not in the key: every tau shares it).
3. masks (``apply``): per layer one threshold ``θ`` = the tau-quantile (``np.percentile(method='nearest')``) of
   that layer's Ā inside its observed box (``find_bounds``), pooled over heads (``threshold_scope=layer``, the paper
   code) or per head (``head``, the LLaMA follow-up); prune every grid entry with ``Ā <= θ`` (ties at θ are pruned,
   so tau=0 prunes the entries equal to the minimum, usually exact zeros). Separate masks for encoder self,
   decoder self and cross attention; one tau for all (faithful) or one per type. ``control=random`` prunes
   exactly ``floor(tau * H * R_box * C_box)`` uniformly random in-box entries per layer, keeping the rest of the
   grid (the paper's ``RANDOM_PRUNE``).
4. ``Train("masked")``: ``protocol=retrain`` (default, spec §2.4 [INF]: from the same initialisation as the dense
   run, i.e. the same seeded init or the same pretrained checkpoint, same hyper-parameters and steps),
   ``protocol=finetune`` (ablation b: continue from the dense checkpoint), ``protocol=inference`` (ablation c: no
   masked training; the dense weights are evaluated with the mask).
5. optional ``Sweep("tau")`` (``sweep=0.5/0.8/0.9``): the final weights evaluated with the masks of other taus
   (eval-only pruning, a cheap extra curve) into the record's operating points.

Masked attention, two named execution modes of the same masks:

- ``mode=dense_masked``: exact masked SDPA (the original's way: dense cost, no savings). Pruned scores are removed
  before the softmax (renormalised over the kept entries); a **fully pruned row** (no kept, valid key) follows
  ``empty_rows``: ``uniform`` (default: what the original's finite fill -1e9 / -32768 gives: the mean of v over the
  row's valid keys, constant in q and k) or ``zero``.
- ``mode=block_sparse``: ``kernels.block_sparse_attention`` with the block layout of the mask ("any element kept")
  plus the bit-packed element mask, so the result equals ``dense_masked`` while only kept blocks cost FLOPs; the
  kernel's ``empty_rows="uniform"`` is the same fallback. Single-query decoding steps use the dense masked row.

Masks are sliced to the actual lengths (``M[:, r0:r0+Lq, :Lk]``) with ``r0`` the query's position: 0 in a full
forward, ``Lk - Lq`` in causal self-attention (bottom-right), and the decoding step in cross-attention (the
decoder self-attention core of the same layer tells it): spec §2.5's fix of fairseq's decoding-row bug.

What tau counts (pitfall 4): by default (``tau_counts=grid``, the paper) the quantile runs over the observed box
*including* structural zeros (causal upper triangle, padding never seen), so a causal layer at tau=0.5 prunes
almost none of its valid entries. The record gives, per layer: nominal tau, the pruned fraction of the grid, the
pruned fraction of the valid entries of the grid, the pruned fraction of valid entries weighted by the real length
distribution (compare methods on this one), and element vs block density for B in {16, 32, 64, 128}.
``tau_counts=valid`` (a named deviation) takes the quantile over valid entries only.

Every deviation from the authors' setup is a named option and listed in ``info()["deviations"]``.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.attention import has_padding, masked_sdpa
from bench.errors import BenchError
from bench.method import AttentionCore, AttentionSpec, Method, MethodContext
from bench.registry import register_method
from kernels import AttentionStatsAccumulator, block_sparse_attention
from kernels.masks import block_sparse_flops, layout_from_element_mask, mask_sparsity, pack_element_mask

NAME = "attention_pruning"
TYPES = ("enc_self", "dec_self", "cross")
MODES = ("dense_masked", "block_sparse")
CONTROLS = ("none", "random")
SCOPES = ("layer", "head")
PERCENTILES = ("nearest", "linear")
BOUNDS = ("fixed", "legacy", "none")
TAU_COUNTS = ("grid", "valid")
COUNTS = ("row", "legacy_batch")
EMPTY_ROWS = ("uniform", "zero")
PROTOCOLS = ("retrain", "finetune", "inference")
BACKENDS = ("auto", "triton", "torch")
REPORT_BLOCKS = (16, 32, 64, 128)
STATS_VERSION = 1
KERNEL_HEAD_DIMS = (16, 32, 64, 128)


def _err(msg: str) -> BenchError:
    return BenchError(f"{NAME}: {msg}")


# ---- configuration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class APConfig:
    tau: float = 0.5  # fraction of each layer's (bounded) grid pruned, every pruned type; in [0, 1)
    tau_enc_self: float | None = None  # per-type tau (None: ``tau``)
    tau_dec_self: float | None = None
    tau_cross: float | None = None
    prune: str = "all"  # attention types pruned: all | '+'-joined subset of enc_self, dec_self, cross
    mode: str = "dense_masked"  # dense_masked (exact, no savings; the original) | block_sparse (Triton kernel)
    control: str = "none"  # none (data-informed AP) | random (RANDOM_PRUNE control at the same tau)
    threshold_scope: str = "layer"  # layer (paper code: one θ per layer, pooled over heads) | head (follow-up)
    percentile: str = "nearest"  # nearest (paper, np.percentile method='nearest') | linear (follow-up)
    bounds: str = "fixed"  # fixed (find_bounds) | legacy (find_bounds' full-grid off-by-one) | none (TXL: full grid)
    tau_counts: str = "grid"  # grid (paper: structural zeros count in tau) | valid (deviation: valid entries only)
    count: str = "row"  # row (per-row counts, rows sum to 1; spec's recommendation) | legacy_batch (fairseq)
    empty_rows: str = "uniform"  # uniform (the original's finite fill) | zero (deviation)
    protocol: str = "retrain"  # retrain (same init; spec §2.4 [INF]) | finetune (from the dense ckpt) | inference
    dense_steps: int = 0  # steps of the dense stage; 0 = train.steps (shared dense checkpoint)
    masked_steps: int = 0  # steps of the masked stage; 0 = train.steps
    masked_lr: float = 0.0  # peak LR of the masked stage; 0 = train.lr (protocol=finetune: warm-up <= steps / 10)
    block_size: int = 64  # block_sparse mode: layout block (kernel tile); default from the task (default_config)
    sweep: str = ""  # '/'-separated taus evaluated eval-only after training, e.g. 0.5/0.8/0.9 ('' = none)
    stats_max_sequences: int = 0  # 0 = the whole training split (faithful); N = the first N sequences (deviation)
    stats_flush_sequences: int = 512  # sequences buffered per core before the accumulator runs (speed only)
    backend: str = "auto"  # kernels backend (statistics and block-sparse attention): auto | triton | torch
    note: str = ""  # set by default_config when a value differs from the paper

    def __post_init__(self):
        def bad(name, expected):
            raise BenchError(f"invalid value for {NAME}:{name}={getattr(self, name)!r}; expected {expected}")

        for name in ("tau", "tau_enc_self", "tau_dec_self", "tau_cross"):
            v = getattr(self, name)
            if v is None and name != "tau":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v < 1.0):
                bad(name, "a fraction in [0, 1) (tau=0.9 prunes 90 % of each layer's grid; tau=1 would prune "
                          "everything)")
        for name, valid in (("mode", MODES), ("control", CONTROLS), ("threshold_scope", SCOPES),
                            ("percentile", PERCENTILES), ("bounds", BOUNDS), ("tau_counts", TAU_COUNTS),
                            ("count", COUNTS), ("empty_rows", EMPTY_ROWS), ("protocol", PROTOCOLS),
                            ("backend", BACKENDS)):
            if getattr(self, name) not in valid:
                bad(name, "one of " + ", ".join(valid))
        types = self.pruned_types
        if not types:
            bad("prune", "all or a '+'-joined subset of " + ", ".join(TYPES))
        if self.stats_flush_sequences < 1:
            bad("stats_flush_sequences", "an integer >= 1")
        self.sweep_taus  # validates

    @property
    def pruned_types(self) -> tuple[str, ...]:
        if self.prune == "all":
            return TYPES
        parts = tuple(p.strip() for p in self.prune.split("+") if p.strip())
        if not parts or any(p not in TYPES for p in parts):
            return ()
        return parts

    @property
    def sweep_taus(self) -> tuple[float, ...]:
        if not self.sweep:
            return ()
        out = []
        for p in self.sweep.replace(",", "/").split("/"):
            try:
                t = float(p)
            except ValueError:
                t = math.nan
            if not 0.0 <= t < 1.0:
                raise BenchError(f"invalid value for {NAME}:sweep={self.sweep!r}; expected '/'-separated taus in "
                                 f"[0, 1), e.g. 0.5/0.8/0.9")
            out.append(t)
        return tuple(out)

    def tau_for(self, typ: str) -> float | None:
        """The tau of attention type ``typ``, None when that type is not pruned."""
        if typ not in self.pruned_types:
            return None
        v = getattr(self, f"tau_{typ}")
        return self.tau if v is None else v


def attention_type(spec: AttentionSpec) -> str:
    """enc_self | dec_self | cross for a backbone's AttentionSpec."""
    if spec.kind == "cross":
        return "cross"
    if spec.kind == "decoder_self" or spec.causal:
        return "dec_self"
    return "enc_self"


# ---- step 2 helpers: counting, bounds, thresholds (pure functions; tests call them) -------------------------
def find_bounds(total: torch.Tensor, legacy: bool = False) -> tuple[int, int]:
    """(R, C): the rows/columns before the first all-zero suffix of ``total`` (Σ_h Ā of a layer, (R, C)).
    ``legacy``: the paper code's off-by-one, a full grid (no zero suffix) gives ``size - 1``."""
    nz = total != 0

    def one(v: torch.Tensor) -> int:
        idx = torch.nonzero(v).flatten()
        end = int(idx[-1]) + 1 if idx.numel() else 0
        if legacy and end == v.numel():
            return v.numel() - 1
        return end

    return one(nz.any(1)), one(nz.any(0))


def nearest_percentile(values: torch.Tensor, q: float) -> float:
    """``np.percentile(values, 100 q, method='nearest')``: the element at index ``round_half_even(q (n-1))``
    of the sorted values (NumPy >= 2 removed the old ``interpolation=`` keyword: pitfall 5)."""
    v = values.flatten().double().cpu()
    n = v.numel()
    idx = int(np.around(q * (n - 1)))  # np.around rounds half to even, as np.percentile(method='nearest')
    return float(torch.kthvalue(v, idx + 1).values)


def linear_percentile(values: torch.Tensor, q: float) -> float:
    return float(np.percentile(values.flatten().double().cpu().numpy(), 100.0 * q))


def _valid_grid(R: int, C: int, causal: bool) -> torch.Tensor:
    """(R, C) bool: the entries a query can see on the grid (causal: ``j <= i + C - R``, bottom-right)."""
    g = torch.ones(R, C, dtype=torch.bool)
    return g.tril(diagonal=C - R) if causal else g


def ap_prune_mask(mean: torch.Tensor, tau: float, *, causal: bool = False, scope: str = "layer",
                  percentile: str = "nearest", bounds: str = "fixed", tau_counts: str = "grid") -> tuple[torch.Tensor, dict]:
    """AP's pruning rule for one layer: ``mean`` (H, R, C) statistics -> bool keep mask (H, R, C) and facts.

    θ = the tau-quantile of the layer's statistics inside the bounding box (pooled over heads, or per head);
    an entry is pruned iff ``Ā <= θ`` anywhere on the grid (inside the box or not)."""
    if not 0.0 <= tau < 1.0:
        raise _err(f"tau={tau!r}: expected a fraction in [0, 1)")
    A = mean.detach().double().cpu()
    H, R, C = A.shape
    if bounds == "none":
        rb, cb = R, C
    else:
        rb, cb = find_bounds(A.sum(0), legacy=bounds == "legacy")
    if rb == 0 or cb == 0:  # nothing observed: everything is pruned (fully pruned rows -> uniform)
        return torch.zeros(H, R, C, dtype=torch.bool), {"threshold": None, "box": [rb, cb]}
    box = A[:, :rb, :cb]
    sel = None
    if tau_counts == "valid":
        sel = _valid_grid(R, C, causal)[:rb, :cb]
    pick = nearest_percentile if percentile == "nearest" else linear_percentile

    def vals(x):  # (h, rb, cb) -> 1-d values the quantile runs over
        return x[:, sel] if sel is not None else x.reshape(-1)

    if scope == "layer":
        theta = pick(vals(box), tau)
        prune = A <= theta
        thr = theta
    else:
        thetas = [pick(vals(box[h:h + 1]), tau) for h in range(H)]
        prune = A <= torch.tensor(thetas, dtype=torch.float64)[:, None, None]
        thr = thetas
    return ~prune, {"threshold": thr, "box": [rb, cb]}


def random_prune_mask(mean: torch.Tensor, tau: float, generator: torch.Generator, bounds: str = "fixed") -> tuple[torch.Tensor, dict]:
    """The paper's ``RANDOM_PRUNE`` control: exactly ``floor(tau * H * R_box * C_box)`` in-box entries of the layer,
    drawn uniformly across heads, are pruned; entries outside the box are kept."""
    if not 0.0 <= tau < 1.0:
        raise _err(f"tau={tau!r}: expected a fraction in [0, 1)")
    A = mean.detach().double().cpu()
    H, R, C = A.shape
    rb, cb = (R, C) if bounds == "none" else find_bounds(A.sum(0), legacy=bounds == "legacy")
    keep = torch.ones(H, R, C, dtype=torch.bool)
    n_box = H * rb * cb
    n = int(math.floor(tau * n_box))
    if n:
        idx = torch.randperm(n_box, generator=generator)[:n]
        box = torch.ones(n_box, dtype=torch.bool)
        box[idx] = False
        keep[:, :rb, :cb] = box.view(H, rb, cb)
    return keep, {"threshold": None, "box": [rb, cb], "n_random_pruned": n}


def _prefix2d(x: torch.Tensor) -> torch.Tensor:
    """(R, C) -> (R+1, C+1) int64 2-D prefix sums: P[a, b] = x[:a, :b].sum()."""
    p = torch.zeros(x.shape[0] + 1, x.shape[1] + 1, dtype=torch.int64)
    p[1:, 1:] = x.to(torch.int64).cumsum(0).cumsum(1)
    return p


def mask_facts(keep: torch.Tensor, causal: bool, lengths: dict | None = None, blocks=REPORT_BLOCKS) -> dict:
    """Measured sparsity of a keep mask (H, R, C): pruned fraction of the grid, of its valid entries, of the valid
    entries of the observed sequences (``lengths``: {(lq, lk): count}, pitfall 4's (c)), fully pruned rows, and
    element vs block density per block size (pitfall 10)."""
    H, R, C = keep.shape
    valid = _valid_grid(R, C, causal)
    kept_valid = keep & valid
    n_valid = int(valid.sum())
    out = {
        "grid_pruned_fraction": 1.0 - float(keep.sum()) / (H * R * C),
        "valid_pruned_fraction": 1.0 - float(kept_valid.sum()) / max(1, H * n_valid),
        "fully_pruned_rows_grid": int((~kept_valid.any(-1)).sum()),
        "rows_grid": H * R,
        "per_head_valid_kept": [round(float(kept_valid[h].sum()) / max(1, n_valid), 6) for h in range(H)],
    }
    if lengths:
        pk = _prefix2d(kept_valid.sum(0))
        pv = _prefix2d(valid)
        kept_w = valid_w = 0
        empty_w = rows_w = 0
        for (lq, lk), n in lengths.items():
            lq, lk = min(lq, R), min(lk, C)
            if causal:  # a length-l causal sequence sees the grid's lower triangle restricted to [:l, :l]
                lk = lq = min(lq, lk)
            kept_w += n * int(pk[lq, lk])
            valid_w += n * H * int(pv[lq, lk])
            sub = keep[:, :lq, :lk] & valid[:lq, :lk]
            empty_w += n * int((~sub.any(-1)).sum())
            rows_w += n * H * lq
        out["valid_pruned_fraction_observed"] = 1.0 - kept_w / max(1, valid_w)
        out["fully_pruned_rows_observed_fraction"] = empty_w / max(1, rows_w)
    dens = {}
    for bs in blocks:
        s = mask_sparsity(keep, bs, causal=causal)
        dens[str(bs)] = {"element_density": round(s["element_density"], 6), "block_density": round(s["block_density"], 6),
                         "covered_density": round(s["covered_density"], 6)}
    out["by_block_size"] = dens
    return out


def mask_image(keep: torch.Tensor, max_side: int = 64) -> list:
    """Head-mean kept fraction (percent, int) of a keep mask, average-pooled to at most ``max_side`` per side."""
    m = keep.float().mean(0)[None, None]
    R, C = m.shape[-2:]
    f = max(1, math.ceil(max(R, C) / max_side))
    if f > 1:
        m = F.avg_pool2d(m, f, f, ceil_mode=True)
    return (m[0, 0] * 100).round().to(torch.int16).tolist()


def uniform_rows(v: torch.Tensor, key_padding_mask, causal: bool, lq: int) -> torch.Tensor:
    """(B, H, lq, D): each query row's mean of v over its valid keys (real; ``j <= i + Lk - Lq`` when causal);
    0 for a row with no valid key. The finite-fill rule for fully pruned rows (spec §2.4, pitfall 11)."""
    B, H, LK, D = v.shape
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    w = (torch.ones(B, LK, device=v.device, dtype=ct) if key_padding_mask is None
         else key_padding_mask.to(device=v.device, dtype=ct))
    vw = v.to(ct) * w[:, None, :, None]
    if not causal:
        n = w.sum(-1)
        return (vw.sum(2) / n.clamp_min(1.0)[:, None, None])[:, :, None, :].expand(B, H, lq, D)
    cs, cnt = vw.cumsum(2), w.cumsum(-1)
    last = torch.arange(lq, device=v.device) + (LK - lq)
    seen = (last >= 0).to(ct)
    idx = last.clamp_min(0)
    return cs[:, :, idx] / cnt[:, idx].clamp_min(1.0)[:, None, :, None] * seen[None, None, :, None]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex) of the model's parameters and buffers, in name order: which checkpoint statistics came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach()
        if t.is_floating_point():
            t = t.float()
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _prefix_lengths(mask: torch.Tensor, what: str) -> torch.Tensor:
    """Lengths (B,) of a right-padded (B, L) token mask; left or inner padding is an error (pitfall 7)."""
    lengths = mask.sum(1)
    ar = torch.arange(mask.shape[1], device=mask.device)
    if not bool(((ar[None, :] < lengths[:, None]) == mask).all()):
        raise _err(f"{what} is not right-padded (real tokens must be a prefix); AP's absolute-position statistics "
                   "need right padding (spec pitfall 7): pad on the right")
    return lengths


# ---- the statistics collector (one per core) -----------------------------------------------------------------
class StatsCollector:
    """Σ P and counts on a core's (R, C) grid via ``AttentionStatsAccumulator``; see the module docstring."""

    def __init__(self, n_heads: int, R: int, C: int, causal: bool, count: str = "row", backend: str = "auto",
                 flush_sequences: int = 512):
        self.H, self.R, self.C, self.causal, self.count, self.backend = n_heads, R, C, causal, count, backend
        self.flush_sequences = flush_sequences
        self.sum: torch.Tensor | None = None  # (H, R, C) fp64
        self.cnt: torch.Tensor | None = None  # (R,) rows (count=row) or (R, C) elements (legacy_batch), fp64
        self.lengths: Counter = Counter()  # (lq, lk) -> sequences
        self.sequences = 0
        self._buf: dict = defaultdict(list)
        self._n_buf = 0

    def _init(self, device):
        if self.sum is None:
            self.sum = torch.zeros(self.H, self.R, self.C, dtype=torch.float64, device=device)
            shape = (self.R,) if self.count == "row" else (self.R, self.C)
            self.cnt = torch.zeros(shape, dtype=torch.float64, device=device)

    def _square_sum(self, q, k, kpm):
        """Σ_b P_b (H, L, L) fp32 of the (square-padded) inputs with the shared accumulator."""
        acc = AttentionStatsAccumulator(causal=self.causal, per_head=True, backend=self.backend)
        acc.update(q, k, key_padding_mask=kpm)
        return acc.sum

    def _add(self, q, k, lq: int, lk: int, kpm=None):
        """q (n, H, lq, D), k (n, H, lk, D): add their Σ P into [:lq, :lk] (no padding inside for count=row)."""
        n = q.shape[0]
        if lq != lk:  # rectangular (cross-attention): pad to a square; padded keys masked, padded query rows dropped
            L = max(lq, lk)
            qs = q.new_zeros(n, q.shape[1], L, q.shape[3])
            ks = k.new_zeros(n, k.shape[1], L, k.shape[3])
            qs[:, :, :lq], ks[:, :, :lk] = q, k
            pad = torch.arange(L, device=q.device)[None, :] < lk
            kp = pad.expand(n, L) if kpm is None else torch.cat([kpm, kpm.new_zeros(n, L - lk)], 1)
            s = self._square_sum(qs, ks, kp)
        else:
            s = self._square_sum(q, k, kpm)
        self.sum[:, :lq, :lk] += s[:, :lq, :lk].double()
        return n

    def update(self, q, k, key_padding_mask=None, query_lengths=None):
        """One forward's q (B, H, Lq, D), k (B, H, Lk, D); ``key_padding_mask`` (B, Lk) True = real key;
        ``query_lengths`` (B,) real queries (default: the key lengths in self-attention, else Lq)."""
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        if Lq > self.R or Lk > self.C:
            raise _err(f"statistics: inputs of {Lq} x {Lk} do not fit the layer's grid {self.R} x {self.C}")
        self._init(q.device)
        q, k = q.detach(), k.detach()
        kpm = key_padding_mask if has_padding(key_padding_mask) else None
        if self.count == "legacy_batch":  # fairseq: padded batch, every element of [:Lq, :Lk] counts B
            if query_lengths is not None:
                self.lengths.update(zip(query_lengths.tolist(), [Lk] * B))
            self._add(q, k, Lq, Lk, kpm)
            self.cnt[:Lq, :Lk] += B
            self.sequences += B
            return
        lk_b = _prefix_lengths(kpm, "key_padding_mask") if kpm is not None else torch.full((B,), Lk, device=q.device)
        if query_lengths is not None:
            lq_b = query_lengths.to(q.device)
            if self.causal and Lq == Lk:  # a real causal query i < len sees keys j <= i only: all real
                lk_b = torch.minimum(lk_b, lq_b)
        elif Lq == Lk:
            lq_b = lk_b  # self-attention: the same tokens are queries and keys
        else:
            lq_b = torch.full((B,), Lq, device=q.device)
        pairs = torch.stack([lq_b, lk_b], 1).tolist()
        groups: dict = defaultdict(list)
        for b, (a, c) in enumerate(pairs):
            if a > 0 and c > 0:
                groups[(int(a), int(c))].append(b)
        for (a, c), idx in groups.items():
            ix = torch.tensor(idx, device=q.device)
            self._buf[(a, c)].append((q.index_select(0, ix)[:, :, :a], k.index_select(0, ix)[:, :, :c]))
            self._n_buf += len(idx)
            self.lengths[(a, c)] += len(idx)
        if self._n_buf >= self.flush_sequences:
            self.flush()

    def flush(self):
        for (a, c), parts in self._buf.items():
            q = torch.cat([p[0] for p in parts])
            k = torch.cat([p[1] for p in parts])
            n = self._add(q, k, a, c)
            self.cnt[:a] += n
            self.sequences += n
        self._buf.clear()
        self._n_buf = 0

    def mean(self) -> torch.Tensor:
        """Ā (H, R, C) fp32 on the CPU; 0 where nothing was counted."""
        self.flush()
        if self.sum is None:
            return torch.zeros(self.H, self.R, self.C)
        cnt = self.cnt[None, :, None] if self.count == "row" else self.cnt[None]
        return torch.where(cnt > 0, self.sum / cnt.clamp_min(1.0), torch.zeros_like(self.sum)).float().cpu()


class _Shared:
    """State the cores of one model share: the current target mask (stats collection in encoder-decoders) and the
    query position of the decoder self-attention per layer (read by the same layer's cross-attention)."""

    def __init__(self):
        self.query_mask: torch.Tensor | None = None
        self.dec_offset: dict[int, int] = {}


# ---- the attention core ------------------------------------------------------------------------------------
class APCore(AttentionCore):
    def __init__(self, spec: AttentionSpec, cfg: APConfig, shared: _Shared):
        super().__init__(spec)
        self.cfg = cfg
        self.type = attention_type(spec)
        self.R, self.C = spec.lq, spec.lk
        self.shared = shared
        self.keep: torch.Tensor | None = None  # (H, R, C) bool keep mask on the CPU; None = dense
        self.collector: StatsCollector | None = None
        self._cache: dict = {}
        self.calls = 0  # masked forwards (tests: every core that should be masked is)
        self.train_calls = 0  # masked forwards in training mode

    # -- masks
    def set_mask(self, keep: torch.Tensor | None) -> None:
        if keep is not None:
            shape = (self.spec.n_heads, self.R, self.C)
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != shape:
                got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
                raise _err(f"the mask for {self.type} layer {self.spec.layer} has shape {got}, expected a bool "
                           f"{shape} (n_heads, max_len, max_len_kv) keep mask of this model; rebuild the masks from "
                           f"this model's attention statistics")
            keep = keep.cpu()
        self.keep = keep
        self._cache.clear()

    def _row_offset(self, Lq: int, Lk: int) -> int:
        if self.type == "cross":
            return self.shared.dec_offset.get(self.spec.layer, 0) if Lq == 1 else 0
        return Lk - Lq if self.spec.causal else 0  # bottom-right aligned queries (KV-cache decoding)

    def _slice(self, r0, Lq, Lk):
        if r0 + Lq > self.R or Lk > self.C:
            raise _err(f"{self.type} layer {self.spec.layer}: queries {r0}..{r0 + Lq} x {Lk} keys exceed the mask "
                       f"grid {self.R} x {self.C} (the masks are built for the model's max lengths)")
        return self.keep[:, r0:r0 + Lq, :Lk]

    def _dense_mask(self, r0, Lq, Lk, device):
        key = ("dense", r0, Lq, Lk, device)
        if key not in self._cache:
            m = self._slice(r0, Lq, Lk)
            valid = _valid_grid(Lq, Lk, self.spec.causal)
            allowed = m & valid
            static_empty = bool((~allowed.any(-1)).any())  # a fully pruned row even without padding
            self._cache[key] = (allowed.to(device), valid.to(device), static_empty)
        return self._cache[key]

    def _block(self, r0, Lq, Lk, device):
        key = ("block", r0, Lq, Lk, device)
        if key not in self._cache:
            m = self._slice(r0, Lq, Lk)
            lay = layout_from_element_mask(m, self.cfg.block_size, causal=self.spec.causal)
            self._cache[key] = (lay.to(device), pack_element_mask(m, device=device), lay)
        return self._cache[key]

    # -- forward
    def forward(self, q, k, v, key_padding_mask=None):
        Lq, Lk = q.shape[2], k.shape[2]
        if self.type == "dec_self":
            self.shared.dec_offset[self.spec.layer] = Lk - Lq
        if self.collector is not None:
            qlen = None
            qm = self.shared.query_mask
            if self.type in ("dec_self", "cross") and qm is not None and tuple(qm.shape) == (q.shape[0], Lq):
                qlen = _prefix_lengths(qm, "the target mask")
            self.collector.update(q, k, key_padding_mask, qlen)
        if self.keep is None:
            return masked_sdpa(q, k, v, key_padding_mask, self.spec.causal)  # the dense baseline's SDPA path
        self.calls += 1
        self.train_calls += int(self.training)
        r0 = self._row_offset(Lq, Lk)
        kpm = key_padding_mask if has_padding(key_padding_mask) else None
        if self.cfg.mode == "block_sparse" and Lq > 1:
            lay, packed, _ = self._block(r0, Lq, Lk, q.device)
            return block_sparse_attention(q, k, v, lay, block_size=self.cfg.block_size, causal=self.spec.causal,
                                          key_padding_mask=kpm, element_mask=packed, empty_rows=self.cfg.empty_rows,
                                          backend=self.cfg.backend)
        return self._dense_masked(q, k, v, kpm, r0)

    def _dense_masked(self, q, k, v, kpm, r0):
        """Exact masked SDPA: kept & valid entries renormalised; fully pruned rows uniform (or zero)."""
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        allowed, valid, static_empty = self._dense_mask(r0, Lq, Lk, q.device)  # (H, Lq, Lk), (Lq, Lk), bool
        allowed, valid = allowed[None], valid[None, None]
        if kpm is None and not static_empty:  # no fully pruned row: plain masked SDPA
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        if kpm is not None:
            allowed = allowed & kpm[:, None, None, :]
            valid = valid & kpm[:, None, None, :]
        empty = ~allowed.any(-1, keepdim=True)  # (B|1, H, Lq, 1)
        # a fully pruned row attends to its valid keys (or to everything if it has none) so SDPA stays finite;
        # its output is replaced below and no gradient reaches q, k through it
        attn = torch.where(empty, valid | ~valid.any(-1, keepdim=True), allowed)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn)
        fill = (uniform_rows(v, kpm, self.spec.causal, Lq).to(out.dtype) if self.cfg.empty_rows == "uniform"
                else torch.zeros((), dtype=out.dtype, device=out.device))
        return torch.where(empty, fill, out)

    def flops(self, q, k, key_padding_mask=None) -> float:
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        if self.keep is None or self.cfg.mode != "block_sparse" or Lq == 1:
            return super().flops(q, k, key_padding_mask)  # dense (masked) SDPA computes every visible pair
        _, _, lay = self._block(self._row_offset(Lq, Lk), Lq, Lk, q.device)
        return float(block_sparse_flops(lay, self.cfg.block_size, B, D, self.spec.causal, Lq, Lk, n_heads=H))


# ---- the method --------------------------------------------------------------------------------------------
# Figure values of the authors' repository (spec §5.1, ap_figure.pdf; ±0.01): tau -> metric, per setting
PAPER_FIGURE = {
    "lm": {"setting": "Transformer-XL base on WikiText-103, test PPL (tau counted on the 150x300 TXL grid, "
                      "24.8 % causal zeros)", "metric": "ppl", "higher": False,
           "points": {0.0: 24.16, 0.2: 24.16, 0.4: 24.21, 0.6: 24.57, 0.8: 25.12}},
    "mt": {"setting": "fairseq Transformer on WMT (pair unverified), BLEU, enc-self + dec-self + cross at one tau",
           "metric": "bleu", "higher": True,
           "points": {0.0: 26.73, 0.2: 26.21, 0.4: 26.60, 0.6: 26.44, 0.8: 21.88}},
    "glue": {"setting": "BERT (run_glue, max_seq_length 128) on GLUE, one aggregated accuracy (tasks unverified)",
             "metric": "accuracy", "higher": True,
             "points": {0.0: 82.06, 0.2: 81.06, 0.4: 79.62, 0.6: 77.09, 0.8: 71.40}},
}


@register_method(NAME)
class AttentionPruning(Method):
    Config = APConfig
    family = "learned_pattern"
    suites = ("lm", "mt", "glue")

    def __init__(self, cfg: APConfig, task=None):
        super().__init__(cfg, task)
        self.shared = _Shared()
        self.init_state: dict | None = None
        self.stats_facts: dict = {}
        self.layer_facts: list[dict] = []
        self.mask_images: list[dict] = []
        self.points: list[dict] = []
        self._means: list[torch.Tensor] | None = None
        self._lengths: list[dict] = []
        self._main_masks: list | None = None
        self._seed = 0

    @classmethod
    def default_config(cls, ctx: MethodContext) -> APConfig:
        """Block size for ``mode=block_sparse``: 64 (the suite's H100/H200 tile) for sequences of 512+, else 16
        (the LLaMA follow-up's B; at 64-128 tokens a 64 block leaves 1-2 blocks per row and nothing to skip)."""
        L = ctx.max_len or 0
        block = 64 if L >= 512 else 16
        note = "" if block == 16 else f"block_size {block} (follow-up: 16) for max_len {L}"
        return APConfig(block_size=block, note=note)

    def make_attention(self, spec: AttentionSpec) -> AttentionCore:
        if self.cfg.mode == "block_sparse" and spec.head_dim not in KERNEL_HEAD_DIMS:
            raise _err(f"mode=block_sparse needs head_dim in {KERNEL_HEAD_DIMS} (the kernel's), got {spec.head_dim}; "
                       f"use mode=dense_masked")
        return APCore(spec, self.cfg, self.shared)

    # ---- protocol ----------------------------------------------------------------------------------------
    def stages(self, trainer) -> list:
        from bench.stages import Compute, Sweep, Train

        cfg = self.cfg
        st = [Train("dense", steps=cfg.dense_steps or trainer.cfg.train.steps, keep_best=True, candidate=False,
                    artifact="dense_checkpoint"),
              Compute("attention_stats", fn=self.collect_stats, apply=self.apply_stats, artifact="attention_stats",
                      artifact_key={"count": cfg.count, "max_sequences": cfg.stats_max_sequences,
                                    "version": STATS_VERSION})]
        if cfg.protocol != "inference":
            steps = cfg.masked_steps or trainer.cfg.train.steps
            warm = None
            if cfg.protocol == "finetune":  # a short fine-tune of a converged model: warm-up at most a tenth of it
                warm = min(trainer.cfg.train.warmup_steps, steps // 10)
            st.append(Train("masked", steps=steps, optimizer="new", lr=cfg.masked_lr or None, warmup_steps=warm))
        if cfg.sweep_taus:
            st.append(Sweep("tau", points=tuple({"tau": t} for t in cfg.sweep_taus), apply=self.apply_point))
        return st

    def on_train_start(self, trainer) -> None:
        self._seed = int(trainer.cfg.seed)
        if self.cfg.protocol == "retrain":  # the same initialisation for the masked retraining (spec §2.4)
            self.init_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
        if self.cfg.note:
            trainer.note("attention_pruning config note", note=self.cfg.note)

    def on_stage_start(self, trainer, stage) -> None:
        name = getattr(stage, "name", "")
        if name == "masked" and self.cfg.protocol == "retrain" and self.init_state is not None:
            trainer.model.load_state_dict(self.init_state)
            trainer.note("attention_pruning: masked retraining starts from the dense run's initialisation")

    def on_stage_end(self, trainer, stage) -> None:
        if getattr(stage, "name", "") == "tau" and self._main_masks is not None:  # the sweep is over: main masks
            for core, keep in zip(self.cores, self._main_masks):
                core.set_mask(keep)

    # ---- statistics (Compute stage) ----------------------------------------------------------------------
    def _identity(self, trainer) -> dict:
        return {"task": trainer.cfg.task, "cores": [asdict(c.spec) for c in self.cores]}

    def collect_stats(self, trainer) -> dict:
        """One pass over the training split with the dense model; returns the statistics payload."""
        cfg, model, task = self.cfg, trainer.model, trainer.task
        for c in self.cores:
            c.set_mask(None)
            c.collector = StatsCollector(c.spec.n_heads, c.R, c.C, c.spec.causal, cfg.count, cfg.backend,
                                         cfg.stats_flush_sequences)
        hook = _install_query_mask_hook(model, self.shared)
        was_training = model.training
        model.eval()
        n_seq = n_batches = 0
        try:
            with torch.no_grad(), trainer.autocast():
                for batch in task.eval_batches("train"):
                    batch = task.to_device(batch, trainer.device)
                    task.loss(model, batch)
                    n_batches += 1
                    n_seq = max(c.collector.sequences + c.collector._n_buf for c in self.cores)
                    if cfg.stats_max_sequences and n_seq >= cfg.stats_max_sequences:
                        break
            means = [c.collector.mean() for c in self.cores]
            lengths = [dict(c.collector.lengths) for c in self.cores]
            seqs = [c.collector.sequences for c in self.cores]
        finally:
            if hook is not None:
                hook.remove()
            self.shared.query_mask = None
            for c in self.cores:
                c.collector = None
            model.train(was_training)
        payload = {**self._identity(trainer), "version": STATS_VERSION, "checkpoint": weights_fingerprint(model),
                   "count": cfg.count, "split": "train", "batches": n_batches, "sequences_per_core": seqs,
                   "means": means, "lengths": lengths}
        trainer.note("attention_pruning statistics", batches=n_batches, sequences=max(seqs) if seqs else 0)
        return payload

    def check_stats(self, trainer, payload) -> None:
        """One-line errors for statistics of another task, model shape or checkpoint."""
        if not isinstance(payload, dict) or payload.get("version") != STATS_VERSION or "means" not in payload:
            raise _err("the attention statistics are not an attention_pruning statistics payload (version "
                       f"{STATS_VERSION}); delete that attention_stats artifact so it is recomputed")
        me = self._identity(trainer)
        if payload["task"] != me["task"]:
            raise _err(f"the attention statistics are from task {payload['task']!r}, this run is {me['task']!r}; "
                       "pass statistics collected on this task's dense checkpoint (or delete the artifact)")
        if payload["cores"] != me["cores"]:
            raise _err(f"the attention statistics are for {len(payload['cores'])} attention layers of another shape "
                       f"(this model has {len(me['cores'])}); pass statistics of this model configuration")
        fp = weights_fingerprint(trainer.model)
        if payload["checkpoint"] != fp:
            raise _err(f"the attention statistics are from checkpoint {payload['checkpoint']}, the model here is "
                       f"{fp}; pass statistics collected on this run's dense checkpoint (or delete the artifact)")

    def apply_stats(self, trainer, payload) -> None:
        self.check_stats(trainer, payload)
        self._means = [m.float() for m in payload["means"]]
        self._lengths = [{tuple(k): v for k, v in d.items()} for d in payload["lengths"]]
        self.stats_facts = {"split": payload["split"], "count": payload["count"], "batches": payload["batches"],
                            "sequences_per_core": payload["sequences_per_core"],
                            "dense_checkpoint_sha256_16": payload["checkpoint"]}
        keeps, facts = self.build_masks(self.cfg.tau_for, with_facts=True)
        self._main_masks = keeps
        self.layer_facts = facts
        self.mask_images = [{"type": c.type, "layer": c.spec.layer, "image": mask_image(kp)}
                            for c, kp in zip(self.cores, keeps) if kp is not None]
        for core, keep in zip(self.cores, keeps):
            core.set_mask(keep)
        trainer.note("attention_pruning masks", pruned_valid=[
            round(f["valid_pruned_fraction"], 4) for f in facts if f.get("pruned")])

    def build_masks(self, tau_for, with_facts: bool = False):
        """Keep masks (one per core, None where the type is not pruned) from the collected statistics."""
        if self._means is None:
            raise _err("no attention statistics: the attention_stats stage must run before the masks are built")
        cfg = self.cfg
        keeps, facts = [], []
        for i, (core, mean) in enumerate(zip(self.cores, self._means)):
            tau = tau_for(core.type)
            if tau is None:
                keeps.append(None)
                facts.append({"type": core.type, "layer": core.spec.layer, "pruned": False})
                continue
            if cfg.control == "random":
                g = torch.Generator().manual_seed(self._seed * 1000 + i)
                keep, f = random_prune_mask(mean, tau, g, cfg.bounds)
            else:
                keep, f = ap_prune_mask(mean, tau, causal=core.spec.causal, scope=cfg.threshold_scope,
                                        percentile=cfg.percentile, bounds=cfg.bounds, tau_counts=cfg.tau_counts)
            keeps.append(keep)
            if with_facts:
                lengths = self._lengths[i] if i < len(self._lengths) else None
                f = {"type": core.type, "layer": core.spec.layer, "pruned": True, "tau": tau, **f,
                     **mask_facts(keep, core.spec.causal, lengths)}
                facts.append(f)
        return keeps, facts

    def apply_point(self, trainer, point) -> dict:
        """Sweep: the masks of another tau (every pruned type) on the final weights; facts for the record."""
        tau = float(point["tau"] if isinstance(point, dict) else point)
        keeps, facts = self.build_masks(lambda t: tau if t in self.cfg.pruned_types else None, with_facts=True)
        for core, keep in zip(self.cores, keeps):
            core.set_mask(keep)
        pr = [f for f in facts if f.get("pruned")]
        return {"tau": tau, "eval_only": True,
                "valid_pruned_fraction": _mean([f["valid_pruned_fraction"] for f in pr]),
                "valid_pruned_fraction_observed": _mean([f.get("valid_pruned_fraction_observed") for f in pr]),
                "grid_pruned_fraction": _mean([f["grid_pruned_fraction"] for f in pr])}

    # ---- record ------------------------------------------------------------------------------------------
    def deviations(self) -> list[str]:
        cfg, out = self.cfg, []
        if cfg.bounds == "fixed":
            out.append("bounds=fixed: find_bounds without the paper code's full-grid off-by-one (bounds=legacy keeps it)")
        if cfg.count == "row":
            out.append("count=row: per-row counts over the real queries (spec §2.2's recommendation; the fairseq "
                       "script counts padded batches per element: count=legacy_batch)")
        out.append("statistics in eval mode over the whole train split (fairseq collects in train mode, after "
                   "attention dropout; BERT keeps the last batch only; TXL uses the wrong hidden states)")
        out.append("incremental decoding uses mask row t of the current target step in self- and cross-attention "
                   "(fixes fairseq's row src_len+1)")
        if cfg.tau_counts == "valid":
            out.append("tau_counts=valid: the quantile runs over valid (causal, observed) entries only")
        if cfg.empty_rows == "zero":
            out.append("empty_rows=zero: fully pruned rows output 0 (the original's finite fill makes them uniform)")
        if cfg.protocol != "retrain":
            out.append(f"protocol={cfg.protocol} (spec §2.4 ablation {'b' if cfg.protocol == 'finetune' else 'c'})")
        if cfg.protocol == "finetune" or cfg.masked_lr:
            out.append(f"masked stage: lr {cfg.masked_lr or 'train.lr'}, warm-up "
                       f"{'min(train.warmup_steps, steps / 10)' if cfg.protocol == 'finetune' else 'train.warmup_steps'}")
        if cfg.stats_max_sequences:
            out.append(f"stats_max_sequences={cfg.stats_max_sequences}: statistics from the first "
                       f"{cfg.stats_max_sequences} training sequences only")
        if any(getattr(cfg, f"tau_{t}") is not None for t in TYPES) or cfg.prune != "all":
            out.append("per-type taus / pruned types (the paper uses one tau for every type)")
        if cfg.mode == "block_sparse":
            out.append(f"mode=block_sparse: Triton block-sparse kernel (block {cfg.block_size}) + element mask; "
                       "exact, the original masks densely")
        out.append("no attention-probability dropout in the cores (suite convention)")
        return out

    def info(self) -> dict:
        cfg = self.cfg
        pr = [f for f in self.layer_facts if f.get("pruned")]
        bs = str(cfg.block_size)
        # density_per_layer: what the execution mode computes per pruned layer (block_sparse: kept blocks; dense
        # masked: the valid entries kept, computed densely)
        if cfg.mode == "block_sparse":
            dens = [f["by_block_size"][bs]["block_density"] if bs in f["by_block_size"] else None for f in pr]
        else:
            dens = [1.0 - f["valid_pruned_fraction"] for f in pr]
        out = {
            "ap": {k: getattr(cfg, k) for k in ("tau", "tau_enc_self", "tau_dec_self", "tau_cross", "prune", "mode",
                                                "control", "threshold_scope", "percentile", "bounds", "tau_counts",
                                                "count", "empty_rows", "protocol", "block_size", "dense_steps",
                                                "masked_steps", "masked_lr")},
            "taus": {t: cfg.tau_for(t) for t in TYPES},
            "deviations": self.deviations(),
            "statistics": self.stats_facts,
            "layer_facts": self.layer_facts,
            "density_per_layer": [d for d in dens if d is not None],
            "tested_with": "masked" if pr else "dense",
            "mask_images": self.mask_images,
        }
        if pr:
            out["summary"] = {
                "grid_pruned_fraction": _mean([f["grid_pruned_fraction"] for f in pr]),
                "valid_pruned_fraction": _mean([f["valid_pruned_fraction"] for f in pr]),
                "valid_pruned_fraction_observed": _mean([f.get("valid_pruned_fraction_observed") for f in pr]),
                "fully_pruned_rows_observed_fraction": _mean([f.get("fully_pruned_rows_observed_fraction") for f in pr]),
                "block_density": {b: _mean([f["by_block_size"][b]["block_density"] for f in pr]) for b in
                                  pr[0]["by_block_size"]},
                "covered_density": {b: _mean([f["by_block_size"][b]["covered_density"] for f in pr]) for b in
                                    pr[0]["by_block_size"]},
            }
            by_type = {}
            for t in TYPES:
                ft = [f for f in pr if f["type"] == t]
                if ft:
                    by_type[t] = {"valid_pruned_fraction": _mean([f["valid_pruned_fraction"] for f in ft]),
                                  "valid_pruned_fraction_observed":
                                      _mean([f.get("valid_pruned_fraction_observed") for f in ft])}
            out["summary"]["by_type"] = by_type
        if cfg.note:
            out["note"] = cfg.note
        return out

    # ---- report ------------------------------------------------------------------------------------------
    @classmethod
    def report_section(cls, runs, ctx) -> tuple[list[str], list]:
        return _report_section(runs, ctx)


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _install_query_mask_hook(model, shared: _Shared):
    """Encoder-decoders (``bench.models.seq2seq``): the decoder cores see no target mask, so a forward pre-hook on
    the target embedding stores ``tokens != pad_id`` for the statistics' per-row counts (None for other models)."""
    emb, pad = getattr(model, "tgt_emb", None), getattr(model, "pad_id", None)
    if not isinstance(emb, torch.nn.Embedding) or pad is None or not hasattr(model, "dec"):
        return None

    def pre(module, args):
        tokens = args[0]
        shared.query_mask = tokens != pad if tokens.dim() == 2 else None

    return emb.register_forward_pre_hook(pre)


# ---- report section ----------------------------------------------------------------------------------------
def _record(r) -> dict:
    """The run's record (the frame has no column for operating points or cost: read the file)."""
    import json

    try:
        with open(r.path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _operating_points(r) -> list:
    return [p for p in (_record(r).get("operating_points") or []) if isinstance(p, dict)]


def _family_of(suite: str) -> str | None:
    return {"lm": "lm", "mt": "mt", "glue": "glue"}.get(suite)


def _ap_row(r, dense_ms: float, main: str) -> dict:
    from bench import report as R

    info = r.info
    ap, summ = info.get("ap") or {}, info.get("summary") or {}
    bs = str(ap.get("block_size", ""))
    bd = (summ.get("block_density") or {}).get(bs)
    # attention FLOPs the final model computes (the record's forward cost at real batch lengths) vs dense; negative
    # when partial blocks of short sequences are computed whole
    dens = (_record(r).get("cost") or {}).get("attention_density_by_layer") or []
    saved_attn = 1.0 - float(np.mean(dens)) if dens else None
    masked_ms = (r.by_phase or {}).get("masked")
    ratio = None if R.is_missing(dense_ms) or R.is_missing(masked_ms) else masked_ms / dense_ms
    taus = info.get("taus") or {}
    present = list((summ.get("by_type") or {}).keys())
    by_type = summ.get("by_type") or {}
    return {
        "method": r.label, "seed": str(r.seed),
        "tau": ", ".join(f"{t} {taus[t]:g}" for t in TYPES if t in present and taus.get(t) is not None) or R.NA,
        "control": ap.get("control", R.NA), "protocol": ap.get("protocol", R.NA), "mode": ap.get("mode", R.NA),
        main: R.fmt_num(r.metrics.get(main)),
        f"{main} (dense stage ckpt + mask)": R.fmt_num(r.metrics.get(f"{main}_best_dense"), R.NA),
        "pruned (grid)": R.fmt_num(summ.get("grid_pruned_fraction")),
        "pruned (valid, observed)": ", ".join(f"{t} {R.fmt_num(v.get('valid_pruned_fraction_observed'))}"
                                              for t, v in by_type.items()) or R.NA,
        f"block density (B={bs})": R.fmt_num(bd),
        "attention FLOPs saved": R.fmt_num(saved_attn, R.NA),
        "dense-stage ms": R.fmt_num((r.by_phase or {}).get("dense"), R.NA),
        "masked-stage ms": R.fmt_num(masked_ms, R.NA), "masked / fastest dense": R.fmt_ratio_or_na(ratio),
        "wall-clock saved": R.NA if ratio is None else f"{100 * (1 - ratio):.1f} %",
        "peak MiB": R.fmt_num(r.mem_mib),
    }


def _curve_figure(task: str, t, ours, main: str, hib: bool, ref: dict | None, dense_val: float | None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    groups: dict = defaultdict(list)
    for r in t[ours].itertuples():
        info = r.info
        ap = info.get("ap") or {}
        key = f"{ap.get('control')} / {ap.get('prune')} / {ap.get('protocol')}"
        x = (info.get("summary") or {}).get("valid_pruned_fraction_observed")
        if x is None or r.metrics.get(main) is None:
            continue
        groups[key].append((x, r.metrics[main], max(v for v in (info.get("taus") or {}).values() if v is not None)))
    base = dense_val
    for i, (key, pts) in enumerate(sorted(groups.items())):
        pts.sort()
        ys = [y / base if base else y for _, y, _ in pts]
        ax.plot([x for x, _, _ in pts], ys, marker="o", label=f"ours: {key}")
        for (x, y, tau), yy in zip(pts, ys):
            ax.annotate(f"τ={tau:g}", (x, yy), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if ref:
        pts = sorted(ref["points"].items())
        r0 = pts[0][1]
        ax.plot([x for x, _ in pts], [y / r0 for _, y in pts], "k--", marker="x", label="ref: authors' figure (x = nominal τ)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("pruned fraction of valid attention entries (observed lengths)")
    ax.set_ylabel(f"{main} / dense" if base else main)
    ax.set_title(f"{task}: quality vs pruned attention", fontsize=9)
    ax.legend(fontsize=6)
    return fig


def _mask_figure(images: list[dict], title: str):
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.9 * cols, 2.1 * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    for ax, im in zip(axes.flat, images):
        ax.set_axis_on()
        a = np.asarray(im["image"], dtype=float)
        ax.imshow(a, cmap="binary", vmin=0, vmax=100, interpolation="nearest")
        ax.set_title(f"{im['type']} L{im['layer']}: kept {a.mean():.0f} %", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def _report_section(s, ctx) -> tuple[list[str], list]:
    import pandas as pd

    from bench import report as R

    mine = s.method.isin(ctx.methods)
    if not mine.any():
        return [], []
    fam = _family_of(ctx.suite)
    ref = PAPER_FIGURE.get(fam) if fam else None
    md = ["### Attention Pruning\n",
          "Per run: the taus per attention type, the control (none = data-informed AP, random = RANDOM_PRUNE at the "
          "same tau), the protocol (retrain from the dense run's initialisation, finetune from the dense checkpoint, "
          "or inference-only), the execution mode (dense_masked: exact, computes everything; block_sparse: the "
          "Triton kernel, computes kept blocks only), the pruned fraction of the grid (what the nominal tau counts, "
          "structural zeros included) and of the valid entries of the observed sequences (compare methods on this "
          "one), the block density the kernel computes, and the train step time against the fastest dense method "
          "of the task measured in the same sweep. On padded inputs (GLUE, MT) the grid is mostly padding that AP "
          "prunes first, so at one nominal tau AP and RANDOM_PRUNE (tau of the in-box entries, drawn uniformly) can "
          "remove very different shares of the entries real sequences use: compare them on that column.\n"]
    if ref:
        md.append(f"`ref:` points (figure): {ref['setting']}; plotted as the ratio to their own tau = 0 value against "
                  "nominal tau. Our curves use the pruned fraction of valid entries; the settings differ (model, data, "
                  "budget), so compare the trends, not the numbers.\n")
    written = []
    for task, t in s[s.task.isin(s[mine].task)].groupby("task", sort=True):
        ours = t.method.isin(ctx.methods)
        main, hib = R._task_metric(t)
        dense_lab, dense_ms = R.fastest(t, t.dense, hardware_of=ours)
        dvals = [m.get(main) for lab, m in zip(t.label, t.metrics) if lab == dense_lab and m.get(main) is not None]
        dense_val = float(np.mean(dvals)) if dvals else None
        md.append(f"#### {task}\n")
        md.append(f"Fastest dense: {f'**{dense_lab}** ({R.fmt_num(dense_ms)} ms/step, {main} {R.fmt_num(dense_val)})' if dense_lab else 'none measured'}.\n")
        rows = [_ap_row(r, dense_ms, main) for r in t[ours].itertuples()]
        md.append(R.md_table(pd.DataFrame(rows)))
        pts = []
        for r in t[ours].itertuples():
            for p in _operating_points(r):
                f, m = p.get("facts") or {}, p.get("metrics") or {}
                pts.append({"run": r.label, "eval-only tau": R.fmt_num(f.get("tau")),
                            "pruned (valid, observed)": R.fmt_num(f.get("valid_pruned_fraction_observed")),
                            f"dev {main}": R.fmt_num(m.get(f"dev_{main}")), f"test {main}": R.fmt_num(m.get(f"test_{main}"))})
        if pts:
            md.append("Eval-only operating points (final weights, masks of another tau):\n")
            md.append(R.md_table(pd.DataFrame(pts)))
        figs = ctx.save(_curve_figure(task, t, ours, main, hib, ref, dense_val), task, "ap_quality_vs_pruned")
        shown = set()
        for r in t[ours].itertuples():
            ap = r.info.get("ap") or {}
            key = (ap.get("control"), ap.get("prune"))
            ims = r.info.get("mask_images") or []
            if not ims or key in shown or ap.get("control") != "none":
                continue
            shown.add(key)
            figs += ctx.save(_mask_figure(ims, f"{task} / {r.label} (seed {r.seed}): kept fraction per layer "
                                               "(head mean)"), task, r.label, f"s{r.seed}", "ap_masks")
        written += figs
        md.append(R.figure_links(figs))
    return md, written

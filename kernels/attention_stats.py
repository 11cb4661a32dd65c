"""
Attention statistics: the batch mean of dense softmax probabilities, never (B, H, L, L)
====================================================================================

``attention_stats(q, k)`` returns ``mean_b softmax(s_b)`` with ``s = sm_scale * q k^T``
(``sm_scale = D ** -0.5``), masked keys (``key_padding_mask`` False, or ``j > i`` when causal)
getting probability 0.  Used by SPION (phase A: the batch- and head-mean map; spec spion.md §3)
and Attention Pruning (dataset mean, per head).

* Output: ``(H, L, L)`` fp32; ``per_head=False`` also averages the heads -> ``(L, L)``.
* ``block_size=bs``: block means ``(H, nb, nb)`` / ``(nb, nb)``, ``nb = ceil(L / bs)``.  Each cell
  is the mean of the P entries of that block **inside the real L x L region**: a partial last
  block (L not a multiple of bs) is divided by its real number of entries
  (``rows_real * cols_real``), not by ``bs^2`` (i.e. it is *not* ``avg_pool2d`` of a zero-padded
  map).  When L is a multiple of bs this equals ``avg_pool2d(P, bs)``.
* Every query row is kept, padded query positions included (SPION averages the full
  ``softmax(QK^T + pad_mask)``).  A row with no unmasked key has probability 0 everywhere.

Triton path (CUDA, or CPU under TRITON_INTERPRET=1):

1. ``_stats_lse_kernel``: one program per (query tile, b*h); an online-softmax pass over all
   key tiles writes the base-2 log-sum-exp of every row, ``(B, H, L)`` fp32.
   Cost ``2 * B*H*L^2*D`` FLOPs (x0.5 causal), reads Q once and K ``L / BLOCK_M`` times.
2. ``_stats_p_kernel``: one program per (query tile, key tile, output head).  It loops over the
   batch (and over the heads of the group when ``per_head=False``), recomputes
   ``P = exp2(s2 - lse2)`` for its tile and sums in registers, then adds the sum to its own tile
   of the fp32 accumulator (or the tile's block mean to one accumulator cell).  Every
   accumulator element is owned by exactly one program: no atomics, deterministic.
   Cost ``2 * B*H*L^2*D`` FLOPs; writes ``4 * H*L^2`` bytes (unpooled) or ``4 * H*nb^2``.

Accumulating over many batches: :class:`AttentionStatsAccumulator` keeps the fp32 sum and the
number of sequences; ``mean()`` divides.
"""

from __future__ import annotations

import math
import numbers

import torch

from .block_sparse_attention import HAS_TRITON, LOG2E, _INTERPRET, _check_triton_usable
from .errors import KernelArgumentError, describe

if HAS_TRITON:
    from .block_sparse_attention import _load_operand, _mask_scores

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["attention_stats", "AttentionStatsAccumulator", "attention_stats_reference"]

_TRITON_POOL_BLOCKS = (16, 32, 64, 128)

if HAS_TRITON:

    @triton.jit
    def _stats_lse_kernel(
        Q, K, KPM, Lse, sm_scale2,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_pb,
        H, L,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = _load_operand(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                          offs_m[:, None] < L, False, UPCAST)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = _load_operand(K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                               offs_n[None, :] < L, False, UPCAST)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * sm_scale2
            s = _mask_scores(s, offs_m, offs_n, L, KPM + b * stride_pb, 0, CAUSAL, HAS_KPM)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
            m_i = m_new
        lse2 = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("inf"))
        tl.store(Lse + pid_bh * L + offs_m, lse2, mask=offs_m < L)

    @triton.jit
    def _stats_p_kernel(
        Q, K, KPM, Lse, Acc, sm_scale2, weight,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_pb,
        stride_ah, stride_am, stride_an,
        B, H, L, HG,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, POOL: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)  # output head (or 0 when heads are averaged)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < L
        col_ok = offs_n < L
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        n_iter = B * HG
        if CAUSAL:  # tile entirely above the diagonal: P == 0, skip the work
            n_iter = tl.where(pid_n * BLOCK_N > pid_m * BLOCK_M + BLOCK_M - 1, 0, n_iter)
        for it in range(0, n_iter):
            b = it // HG
            h = g * HG + it % HG
            q = _load_operand(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                              row_ok[:, None], False, UPCAST)
            kt = _load_operand(K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                               col_ok[None, :], False, UPCAST)
            lse2 = tl.load(Lse + (b * H + h) * L + offs_m, mask=row_ok, other=float("inf"))  # rows past L: P = 0
            s = tl.dot(q, kt, input_precision=DOT_PREC) * sm_scale2
            s = _mask_scores(s, offs_m, offs_n, L, KPM + b * stride_pb, 0, CAUSAL, HAS_KPM)
            acc += tl.exp2(s - lse2[:, None])
        if POOL:
            n_rows = tl.minimum(L - pid_m * BLOCK_M, BLOCK_M)
            n_cols = tl.minimum(L - pid_n * BLOCK_N, BLOCK_N)
            tot = tl.sum(tl.sum(acc, 1), 0) * weight / (n_rows * n_cols).to(tl.float32)
            a_ptr = Acc + g * stride_ah + pid_m * stride_am + pid_n * stride_an
            tl.store(a_ptr, tl.load(a_ptr) + tot)
        else:
            a_ptrs = Acc + g * stride_ah + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
            msk = row_ok[:, None] & col_ok[None, :]
            old = tl.load(a_ptrs, mask=msk, other=0.0)
            tl.store(a_ptrs, old + acc * weight, mask=msk)


def _out_shape(H, L, block_size, per_head):
    n = L if block_size is None else math.ceil(L / block_size)
    return (H, n, n) if per_head else (1, n, n)


def _pool_sum(p, block_size, L):
    """(X, r, L) with r a multiple of bs (or the tail) -> (X, ceil(r/bs), nb) block means."""
    X, r, _ = p.shape
    bs = block_size
    nbr, nb = math.ceil(r / bs), math.ceil(L / bs)
    pad = torch.zeros(X, nbr * bs, nb * bs, dtype=p.dtype, device=p.device)
    pad[:, :r, :L] = p
    sums = pad.view(X, nbr, bs, nb, bs).sum(dim=(2, 4))
    rows = torch.clamp(r - torch.arange(nbr, device=p.device) * bs, max=bs).to(p.dtype)
    cols = torch.clamp(L - torch.arange(nb, device=p.device) * bs, max=bs).to(p.dtype)
    return sums / (rows[:, None] * cols[None, :])


def _stats_sum_torch(q, k, key_padding_mask, causal, block_size, per_head, sm_scale, acc):
    """Add sum_b P_b (head-mean if not per_head) into acc (fp32), query chunk by query chunk."""
    B, H, L, D = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc = q.to(ct), k.to(ct)
    step = max(1, (1 << 24) // max(1, B * H * L))
    if block_size is not None:
        step = max(block_size, step // block_size * block_size)
    cols = torch.arange(L, device=q.device)
    for r0 in range(0, L, step):
        r1 = min(L, r0 + step)
        s = torch.matmul(qc[:, :, r0:r1], kc.transpose(-1, -2)) * sm_scale  # (B, H, c, L)
        valid = torch.ones(1, 1, r1 - r0, L, dtype=torch.bool, device=q.device)
        if causal:
            valid = valid & (cols[None, None, None, :] <= torch.arange(r0, r1, device=q.device)[None, None, :, None])
        if key_padding_mask is not None:
            valid = valid & key_padding_mask.to(q.device)[:, None, None, :]
        s = s.masked_fill(~valid, float("-inf"))
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = torch.exp(s - mx)
        den = e.sum(-1, keepdim=True)
        p = e / torch.where(den > 0, den, torch.ones_like(den))
        p = p.sum(0)  # (H, c, L)
        if not per_head:
            p = p.mean(0, keepdim=True)
        p = p.to(torch.float32)
        if block_size is None:
            acc[:, r0:r1] += p
        else:
            acc[:, r0 // block_size: math.ceil(r1 / block_size)] += _pool_sum(p, block_size, L)
    return acc


def _stats_sum_triton(q, k, key_padding_mask, causal, block_size, per_head, sm_scale, acc):
    B, H, L, D = q.shape
    upcast = _INTERPRET and q.dtype == torch.bfloat16
    prec = ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee") if q.dtype == torch.float32 else "tf32"
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.uint8).contiguous()
        stride_pb, has_kpm = kpm.stride(0), True
    else:
        kpm, stride_pb, has_kpm = q, 0, False
    big = q.dtype != torch.float32 and not _INTERPRET
    bm = 64 if not _INTERPRET else 32
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    _stats_lse_kernel[(triton.cdiv(L, bm), B * H)](
        q, k, kpm, lse, sm_scale * LOG2E,
        *q.stride(), *k.stride(), stride_pb, H, L,
        BLOCK_M=bm, BLOCK_N=bm, HEAD_DIM=D, CAUSAL=bool(causal), HAS_KPM=has_kpm,
        DOT_PREC=prec, UPCAST=upcast, num_warps=4, num_stages=2,
    )
    pool = block_size is not None and block_size in _TRITON_POOL_BLOCKS
    if block_size is not None and not pool:
        # unsupported tile for the in-kernel pooling: compute the dense sum, pool in torch
        dense = torch.zeros(_out_shape(H, L, None, per_head), device=q.device, dtype=torch.float32)
        _stats_sum_triton(q, k, key_padding_mask, causal, None, per_head, sm_scale, dense)
        acc += _pool_sum(dense, block_size, L)
        return acc
    t = block_size if pool else (64 if big else 32)
    if pool:
        # keep the tile x D fp32 operands within registers for big pooling blocks
        warps = 8 if t * D >= 128 * 64 and not _INTERPRET else 4
    else:
        warps = 4
    hg = 1 if per_head else H
    grid = (triton.cdiv(L, t), triton.cdiv(L, t), H // hg)
    _stats_p_kernel[grid](
        q, k, kpm, lse, acc, sm_scale * LOG2E, 1.0 / hg,
        *q.stride(), *k.stride(), stride_pb, *acc.stride(),
        B, H, L, hg,
        BLOCK_M=t, BLOCK_N=t, HEAD_DIM=D, CAUSAL=bool(causal), HAS_KPM=has_kpm, POOL=pool,
        DOT_PREC=prec, UPCAST=upcast, num_warps=warps, num_stages=2,
    )
    return acc


def _validate_options(causal, block_size, per_head, sm_scale):
    E = KernelArgumentError
    if not isinstance(causal, bool):
        raise E(f"causal: expected True or False, got {describe(causal)}")
    if not isinstance(per_head, bool):
        raise E(f"per_head: expected True or False, got {describe(per_head)}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise E(f"block_size: expected None or a positive int, got {describe(block_size)}")
    if sm_scale is not None and (isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real)
                                 or not math.isfinite(sm_scale)):
        raise E(f"sm_scale: expected a finite float or None, got {describe(sm_scale)}")


def _validate(q, k, key_padding_mask, block_size, backend):
    E = KernelArgumentError
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise E(f"{name}: expected a 4-dim tensor (B, H, L, D), got "
                    + (str(tuple(t.shape)) if isinstance(t, torch.Tensor) else describe(t)))
    if k.shape != q.shape:
        raise E(f"k: expected the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise E(f"k: expected q's dtype/device ({q.dtype}, {q.device}), got ({k.dtype}, {k.device})")
    if not isinstance(backend, str) or backend not in ("auto", "triton", "torch"):
        raise E(f"backend: expected one of ('auto', 'triton', 'torch'), got {describe(backend)}")
    allowed = (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if backend == "torch" else ())
    if q.dtype not in allowed:
        raise E(f"q: expected dtype in {allowed}, got {q.dtype}")
    B, H, L, D = q.shape
    if B < 1 or H < 1 or L < 1:
        # a batch of 0 sequences used to return an all-NaN mean (0 / 0)
        raise E(f"q: expected B, H, L >= 1 (a non-empty batch), got shape {tuple(q.shape)}")
    if backend == "triton" and D not in (16, 32, 64, 128):
        raise E(f"q: the triton backend expects head dim D in (16, 32, 64, 128), got {D}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise E(f"block_size: expected None or a positive int, got {describe(block_size)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise E(f"key_padding_mask: expected a bool tensor of shape ({B}, {L}) (True = real token), "
                    f"got {describe(key_padding_mask)}")
        if tuple(key_padding_mask.shape) != (B, L):
            raise E(f"key_padding_mask: expected shape ({B}, {L}), got {tuple(key_padding_mask.shape)}")


def _resolve_backend(q, backend):
    if backend == "auto":
        backend = "triton" if (q.is_cuda and HAS_TRITON and q.shape[-1] in (16, 32, 64, 128)) else "torch"
    if backend == "triton":
        _check_triton_usable(q)
    return backend


def _stats_sum(q, k, key_padding_mask, causal, block_size, per_head, sm_scale, acc, backend):
    fn = _stats_sum_triton if backend == "triton" else _stats_sum_torch
    with torch.no_grad():
        return fn(q.detach(), k.detach(), key_padding_mask, causal, block_size, per_head, sm_scale, acc)


def attention_stats(q, k, *, key_padding_mask=None, causal=False, block_size=None, per_head=True, out=None,
                    sm_scale=None, backend="auto"):
    """Batch mean of the dense softmax probabilities, see the module docstring.

    Returns fp32 ``(H, L, L)`` / ``(H, nb, nb)`` (``per_head=True``) or ``(L, L)`` / ``(nb, nb)``.
    ``out``: optional preallocated fp32 tensor of that shape; the mean is written into it (it is
    overwritten, not accumulated: use :class:`AttentionStatsAccumulator` to sum over batches).
    """
    _validate(q, k, key_padding_mask, block_size, backend)
    _validate_options(causal, block_size, per_head, sm_scale)
    backend = _resolve_backend(q, backend)
    B, H, L, D = q.shape
    sm_scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    shape = _out_shape(H, L, block_size, per_head)
    final_shape = shape if per_head else shape[1:]
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != final_shape \
                or out.device != q.device:
            raise KernelArgumentError(f"out: expected a float32 tensor of shape {final_shape} on {q.device}, "
                                      f"got {describe(out)}")
    acc = torch.zeros(shape, device=q.device, dtype=torch.float32)
    _stats_sum(q, k, key_padding_mask, causal, block_size, per_head, sm_scale, acc, backend)
    res = (acc / B).reshape(final_shape)
    if out is not None:
        out.copy_(res)
        return out
    return res


def attention_stats_reference(q, k, *, key_padding_mask=None, causal=False, block_size=None, per_head=True,
                              sm_scale=None):
    return attention_stats(q, k, key_padding_mask=key_padding_mask, causal=causal, block_size=block_size,
                           per_head=per_head, sm_scale=sm_scale, backend="torch")


class AttentionStatsAccumulator:
    """Sum ``attention_stats`` over many batches; ``mean()`` divides by the number of sequences.

    >>> acc = AttentionStatsAccumulator(block_size=64, per_head=False)
    >>> for q, k, m in batches: acc.update(q, k, key_padding_mask=m)
    >>> pooled = acc.mean()            # (nb, nb) fp32
    """

    def __init__(self, *, causal=False, block_size=None, per_head=True, sm_scale=None, backend="auto"):
        _validate_options(causal, block_size, per_head, sm_scale)
        if not isinstance(backend, str) or backend not in ("auto", "triton", "torch"):
            raise KernelArgumentError(f"backend: expected one of ('auto', 'triton', 'torch'), got {describe(backend)}")
        self.causal = causal
        self.block_size = block_size
        self.per_head = per_head
        self.sm_scale = sm_scale
        self.backend = backend
        self.sum = None  # fp32 running sum over sequences
        self.count = 0

    def update(self, q, k, key_padding_mask=None):
        _validate(q, k, key_padding_mask, self.block_size, self.backend)
        backend = _resolve_backend(q, self.backend)
        B, H, L, D = q.shape
        shape = _out_shape(H, L, self.block_size, self.per_head)
        if self.sum is None:
            self.sum = torch.zeros(shape, device=q.device, dtype=torch.float32)
        elif tuple(self.sum.shape) != shape:
            raise KernelArgumentError(f"q: expected H and L matching the first update (accumulator shape "
                                      f"{tuple(self.sum.shape)}), got shape {tuple(q.shape)}")
        sm_scale = float(D ** -0.5 if self.sm_scale is None else self.sm_scale)
        _stats_sum(q, k, key_padding_mask, self.causal, self.block_size, self.per_head, sm_scale, self.sum, backend)
        self.count += B
        return self

    def mean(self):
        if self.sum is None or self.count == 0:
            raise KernelArgumentError("AttentionStatsAccumulator.mean: no batches were added (call update first)")
        res = self.sum / self.count
        return res if self.per_head else res[0]

    def reset(self):
        self.sum = None
        self.count = 0

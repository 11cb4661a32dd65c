"""
Block-sparse attention (FlashAttention-2 style) in Triton
=========================================================

This module follows the layout of the Triton tutorials: the kernels first, then a thin
wrapper that picks tiles and launches them, the ``torch.autograd.Function``, the plain
PyTorch reference (which is both the CPU path and the test oracle) and the public entry
point :func:`block_sparse_attention`.

Semantics
---------
``q`` is ``(B, H, Lq, D)``, ``k, v`` are ``(B, H, Lk, D)`` (``Lq == Lk`` for self-attention;
cross-attention has ``Lq != Lk``).  ``layout`` is a bool ``(H or 1, nbq, nbk)`` block mask with
``nbq = ceil(Lq / block_size)``, ``nbk = ceil(Lk / block_size)`` (per-(layer, head) layouts: H;
broadcast: 1).  ``element_mask`` (optional) is a bool ``(H or 1, Lq, Lk)`` keep-mask or a
:class:`kernels.masks.PackedMask`.  For query ``i`` let

* ``K_i = {j < Lk : layout[h, i // bs, j // bs] and (not causal or j <= i + Lk - Lq)
  and (no element mask or element_mask[h, i, j])}``  (kept keys; causal is bottom-right aligned,
  the convention of methods/dense.py: the queries are the last Lq positions)
* ``V_i = K_i ∩ {real keys}``  (``key_padding_mask[b, j]`` True)
* ``s_ij = sm_scale * q_i . k_j``

``softmax_mode="renorm"`` (standard block-sparse attention; Attention Pruning's masked softmax)::

    out_i = sum_{j in V_i} softmax_{V_i}(s)_j v_j

i.e. masked entries get ``-inf`` before the softmax, which renormalises over the kept entries.
A row with empty ``V_i`` (a *fully pruned* row) follows ``empty_rows``:

* ``"zero"`` (default): ``out_i = 0`` and it contributes nothing to dq, dk, dv (standard
  block-sparse behaviour; SPION, fixed patterns).
* ``"uniform"``: AP's fidelity mode (spec attention_pruning.md §2.4, pitfall 11, ``uniform_fallback``):
  the original code fills pruned scores with a finite value (-1e9 / -32768) and masks padding (and,
  in fairseq, the causal future) with ``-inf``, so a fully pruned row becomes the *uniform* average
  of ``v`` over its valid keys ``U_i = {j : real key, and j <= i + Lk - Lq when causal}`` — every
  valid key, inside the layout or not.  Its gradient: ``dv_j += do_i / |U_i|`` for ``j in U_i``,
  nothing to dq or dk (the filled scores are constants).  A row with empty ``U_i`` gives 0.  (TXL
  fills the causal future with -1e9 too, i.e. uniform over *all* keys: not reproduced.)

``softmax_mode="phantom_zero"`` (SPION's CUDA kernel, spec spion.md §2.4): every position of
the row outside ``K_i`` is a phantom logit 0 in the denominator::

    out_i = sum_{j in V_i} e^{s_ij} v_j / (sum_{j in V_i} e^{s_ij} + (Lk - |K_i|))

computed stably with a running max that starts at 0 (``m = max(0, max_j s_ij)``), adding
``(Lk - |K_i|) * exp(-m)`` to the row sum before the log-sum-exp is written.  Backward is the
unchanged FA-2 backward (``D_i = rowsum(dO * O)``): phantom logits are constants that never
touch V.  Not combined with causal, an element mask or ``empty_rows="uniform"``.

Algorithm and cost
------------------
Forward: one program per (BLOCK_M query rows, batch*head).  It reads its query tile once,
walks the kept key blocks of its layout row from the row-CSR table (``kernels.layout``),
cut into BLOCK_N-wide sub-tiles, keeps an online softmax (running max ``m``, row sum ``l``,
accumulator ``acc``) in registers, and writes ``out`` and the base-2 log-sum-exp
``lse2 = m + log2(l)`` (fp32, ``(B, H, Lq)``; ``+inf`` for a row with no kept entry).

Backward: two kernels and no atomics (deterministic):

* ``_bwd_dq_kernel`` (row-CSR, one program per query tile): also computes and stores
  ``delta_i = rowsum(dO_i * O_i)``, then ``dS = P * (dO V^T - delta)``, ``dQ = scale * dS K``.
* ``_bwd_dkdv_kernel`` (column-CSC, one program per key tile): walks the kept *query* blocks of
  its key block, recomputes ``P^T`` from the saved lse, ``dV = P^T dO``,
  ``dK = scale * dS^T Q``.

Let ``nnz`` be the number of kept (head, query block, key block) triples over all H heads
(a broadcast layout counts H times),
``T = B * nnz * bs^2`` the number of kept score entries, ``e`` the element size.

* FLOPs (useful): forward ``4 * T * D`` (QK^T and PV); backward ``10 * T * D`` = 2.5x forward
  (dQ kernel: QK^T recompute, dO V^T, dS K; dK/dV kernel: P^T dO, dS^T Q).  The dK/dV kernel also
  recomputes QK^T and dO V^T, so the backward executes ``14 * T * D``; effective TFLOP/s in
  docs/perf.md use the useful counts (fwd+bwd = 3.5x forward, the spec's convention).
* Bytes (compulsory, every tensor touched once; written for Lq = Lk = L, cross-attention reads
  k, v at Lk): forward ``e * 4 * B*H*L*D`` (q, k, v, out) +
  ``4 * B*H*L`` (lse); backward ``e * 8 * B*H*L*D`` (q, k, v, o, dO in; dq, dk, dv out) +
  ``8 * B*H*L`` (lse, delta).  Each query tile re-reads the K/V tiles of its kept blocks, so the
  forward really moves ``~ 2 * e * D * T / BLOCK_M`` more bytes (served partly by L2).  At
  L = 16k, d = 0.25 the FLOP floor (0.37 ms at 752 TFLOP/s) is 8x the compulsory-byte floor
  (0.045 ms at 3 TB/s): the kernel is compute bound.  Measured numbers: docs/perf.md.

* Element mask: bit-packed (kernels.masks), read only for the kept blocks: each kept
  ``BLOCK_M x BLOCK_N`` tile reads ``BLOCK_M * BLOCK_N / 8`` bytes of it (``BLOCK_N / 8`` contiguous
  bytes per query row, expanded to bits in registers), so every pass (fwd, dQ, dK/dV) reads ``T / 8`` bytes, against
  ``2 * e * D * T / BLOCK_M`` bytes of K/V re-reads: for bf16, D = 64, BLOCK_M = 64 that is 1/32
  (3 %) on top.  The FLOPs do not change (compute is skipped per block only).  Stored: ``Hm * ceil128(Lq) * ceil128(Lk)
  / 8`` bytes, one copy per layer.
* ``empty_rows="uniform"``: the fallback rows are computed outside the kernels from ``lse == inf``
  (no kept entry) and a prefix mean of ``v`` (causal) or a mean (non-causal): ``O(B*H*Lk*D)``
  extra FLOPs and fp32 bytes, nothing of size L^2.

Peak extra memory: ``out``, ``lse`` (forward) and ``dq, dk, dv, delta`` (backward): O(L*D).
The LUTs are O(nnz).  Nothing of size L^2 is ever allocated (the element mask is an input).
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch.utils.checkpoint import checkpoint

from .errors import KernelArgumentError, describe
from .layout import LayoutLUT, get_lut, validate_layout
from .masks import PackedMask, pack_element_mask

try:  # triton is optional: the torch backend works without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only when triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

# TRITON_INTERPRET is read by @triton.jit at decoration time, so this module must be imported
# after the variable is set (tests do it at the top of the file).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_for_numpy2():
    """triton 3.6's interpreter turns a loaded scalar (a size-1 numpy array) into a loop bound
    with ``int(arr)``, which numpy >= 2 rejects for 1-d arrays.  Re-register ``__index__`` with
    an explicit element read.  Only active under TRITON_INTERPRET=1; no effect on GPU."""
    import triton.runtime.interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_sparsebench_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparsebench_patched = True
    interp._patch_lang_tensor = patched


if HAS_TRITON and _INTERPRET:
    try:
        _patch_interpreter_for_numpy2()
    except Exception:  # pragma: no cover - a future triton may not need (or allow) this
        pass

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SOFTMAX_MODES = ("renorm", "phantom_zero")
EMPTY_ROWS = ("zero", "uniform")
BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]


# ======================================================================================
# 1. Kernels
# ======================================================================================
if HAS_TRITON:

    # -- helpers shared by every kernel here and in attention_stats.py (inlined by the compiler)
    @triton.jit
    def _load_operand(ptrs, ok, EVEN: tl.constexpr, UPCAST: tl.constexpr):
        """A tile of Q/K/V/dO; ``ok`` masks positions past L (unused when EVEN: L is a tile multiple).
        UPCAST: the interpreter's tl.dot on bf16 is broken, so emulate bf16 x bf16 -> fp32 there."""
        if EVEN:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=ok, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _mask_scores(s, offs_m, offs_n, LK, kpm_row, causal_off, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
        """Scores (BLOCK_M, BLOCK_N) -> -inf where the key is past LK, padded (``kpm_row[n] == 0``, the
        key-padding row of this batch) or, when CAUSAL, after the query's diagonal: key n is visible from
        query m iff ``n <= m + causal_off`` (``causal_off = Lk - Lq``: bottom-right aligned)."""
        valid = offs_n[None, :] < LK
        if HAS_KPM:
            kp = tl.load(kpm_row + offs_n, mask=offs_n < LK, other=0)
            valid = valid & (kp[None, :] != 0)
        if CAUSAL:
            valid = valid & ((offs_m[:, None] + causal_off) >= offs_n[None, :])
        return tl.where(valid, s, float("-inf"))

    @triton.jit
    def _elem_keep(em_head, offs_m, start_n, stride_em, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Element-mask bits of the (BLOCK_M queries, BLOCK_N keys) tile at keys ``start_n ...`` (a multiple of
        8), as int32 0/1.  The mask is bit-packed along keys (byte ``n >> 3``, bit ``n & 7``) and padded to
        128-multiples, so the load needs no bounds mask for any tile of a kept block: each query row reads
        ``BLOCK_N / 8`` contiguous bytes (a vector load), ``BLOCK_M * BLOCK_N / 8`` bytes per tile, and the
        bits are expanded in registers (shift, and: 2 integer ops per score entry)."""
        offs_w = start_n // 8 + tl.arange(0, BLOCK_N // 8)
        w = tl.load(em_head + offs_m[:, None] * stride_em + offs_w[None, :]).to(tl.int32)  # (BLOCK_M, BLOCK_N / 8)
        bits = (w[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1  # (BLOCK_M, BLOCK_N / 8, 8)
        return tl.reshape(bits, (BLOCK_M, BLOCK_N))

    @triton.jit
    def _lut_range(ptr, h, blk, NB, LUT_H_STRIDE):
        """[lo, hi) of block row (CSR) or column (CSC) ``blk`` of head ``h`` in the layout's index table."""
        i = h * LUT_H_STRIDE * NB + blk
        return tl.load(ptr + i), tl.load(ptr + i + 1)

    @triton.jit
    def _fwd_kernel(
        Q, K, V, Out, Lse, KPM, EM,
        row_ptr, col_idx,
        sm_scale2,  # sm_scale * log2(e): scores are kept in base 2
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_pb,  # key padding mask batch stride
        stride_eh, stride_em,  # element mask: head stride (0 = broadcast), row stride (bytes)
        H, LQ, LK, NBQ, NBK, LUT_H_STRIDE, causal_off,
        BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_EM: tl.constexpr, PHANTOM: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        # -- the query tile: read once, BLOCK_M * D * e bytes
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = _load_operand(q_ptrs, offs_m[:, None] < LQ, EVEN_M, UPCAST)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        em_head = EM + h * stride_eh

        # -- this tile's layout row in the CSR table
        SUB: tl.constexpr = BS // BLOCK_N
        lo, hi = _lut_range(row_ptr, h, start_m // BS, NBQ, LUT_H_STRIDE)

        if PHANTOM:
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running max starts at the phantom logit 0
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # -- walk kept key blocks x BLOCK_N sub-tiles as one flat loop (pipelines better than
        #    a nested loop). Per iteration: 2 * BLOCK_N * D * e bytes (K, V) (+ BLOCK_M * BLOCK_N / 8
        #    element-mask bytes), 4*BLOCK_M*BLOCK_N*D FLOPs
        for t in range(lo * SUB, hi * SUB):
            jblk = tl.load(col_idx + t // SUB)
            start_n = jblk * BS + (t % SUB) * BLOCK_N
            offs_n = start_n + offs_n0
            kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, BLOCK_N)
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
            kt = _load_operand(kt_ptrs, offs_n[None, :] < LK, EVEN_N, UPCAST)
            qk = tl.dot(q, kt, input_precision=DOT_PREC) * sm_scale2
            if CAUSAL or HAS_KPM or (not EVEN_N):
                qk = _mask_scores(qk, offs_m, offs_n, LK, KPM + b * stride_pb, causal_off, CAUSAL, HAS_KPM)
            if HAS_EM:
                keep = _elem_keep(em_head, offs_m, start_n, stride_em, BLOCK_M, BLOCK_N)
                qk = tl.where(keep != 0, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            if PHANTOM:
                m_use = m_new  # >= 0, always finite
            else:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = _load_operand(v_ptrs, offs_n[:, None] < LK, EVEN_N, UPCAST)
            p = p.to(Out.dtype.element_ty)
            if UPCAST:
                p = p.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision=DOT_PREC)
            m_i = m_new

        if PHANTOM:
            # |K_i| = kept blocks * BS, minus the part of the last key block beyond LK if kept.
            last = tl.load(col_idx + tl.maximum(hi - 1, 0))
            n_kept = (hi - lo) * BS - tl.where((hi > lo) & (last == NBK - 1), NBK * BS - LK, 0)
            l_i = l_i + (LK - n_kept).to(tl.float32) * tl.exp2(-m_i)
        nonempty = l_i > 0.0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse2 = tl.where(nonempty, m_i + tl.log2(l_safe), float("inf"))  # empty row: P == 0 in bwd

        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        if EVEN_M:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
            tl.store(Lse + pid_bh * LQ + offs_m, lse2)
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < LQ)
            tl.store(Lse + pid_bh * LQ + offs_m, lse2, mask=offs_m < LQ)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, O, DO, Lse, Delta, DQ, KPM, EM,
        row_ptr, col_idx,
        sm_scale, sm_scale2,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        stride_pb,
        stride_eh, stride_em,
        H, LQ, LK, NBQ, LUT_H_STRIDE, causal_off,
        BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_EM: tl.constexpr, EVEN_N: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < LQ

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        # fused "preprocess": delta_i = rowsum(dO_i * O_i), stored for the dK/dV kernel
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(Delta + pid_bh * LQ + offs_m, delta, mask=row_ok)
        lse2 = tl.load(Lse + pid_bh * LQ + offs_m, mask=row_ok, other=float("inf"))
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        em_head = EM + h * stride_eh

        SUB: tl.constexpr = BS // BLOCK_N
        lo, hi = _lut_range(row_ptr, h, start_m // BS, NBQ, LUT_H_STRIDE)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for t in range(lo * SUB, hi * SUB):
            jblk = tl.load(col_idx + t // SUB)
            start_n = jblk * BS + (t % SUB) * BLOCK_N
            offs_n = start_n + offs_n0
            k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # (BLOCK_N, D)
            vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # (D, BLOCK_N)
            k = _load_operand(k_ptrs, offs_n[:, None] < LK, EVEN_N, UPCAST)
            vt = _load_operand(vt_ptrs, offs_n[None, :] < LK, EVEN_N, UPCAST)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale2
            if CAUSAL or HAS_KPM or (not EVEN_N):
                qk = _mask_scores(qk, offs_m, offs_n, LK, KPM + b * stride_pb, causal_off, CAUSAL, HAS_KPM)
            if HAS_EM:
                keep = _elem_keep(em_head, offs_m, start_n, stride_em, BLOCK_M, BLOCK_N)
                qk = tl.where(keep != 0, qk, float("-inf"))
            p = tl.exp2(qk - lse2[:, None])
            dp = tl.dot(do, vt, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            ds = ds.to(DQ.dtype.element_ty)
            if UPCAST:
                ds = ds.to(tl.float32)
            dq += tl.dot(ds, k, input_precision=DOT_PREC)
        dq = dq * sm_scale
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV, KPM, EM,
        col_ptr, row_idx,
        sm_scale, sm_scale2,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        stride_pb,
        stride_eh, stride_em,
        H, LQ, LK, NBK, LUT_H_STRIDE, causal_off,
        BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_EM: tl.constexpr, EVEN_M: tl.constexpr,
        EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        col_ok = offs_n < LK

        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        k = _load_operand(k_ptrs, col_ok[:, None], False, UPCAST)
        v = _load_operand(v_ptrs, col_ok[:, None], False, UPCAST)
        key_ok = col_ok
        if HAS_KPM:
            kp = tl.load(KPM + b * stride_pb + offs_n, mask=col_ok, other=0)
            key_ok = key_ok & (kp != 0)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        em_head = EM + h * stride_eh

        SUB: tl.constexpr = BS // BLOCK_M
        lo, hi = _lut_range(col_ptr, h, start_n // BS, NBK, LUT_H_STRIDE)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for t in range(lo * SUB, hi * SUB):
            iblk = tl.load(row_idx + t // SUB)
            start_m = iblk * BS + (t % SUB) * BLOCK_M
            offs_m = start_m + offs_m0
            q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd  # (BLOCK_M, D)
            do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
            m_ok = offs_m < LQ
            q = _load_operand(q_ptrs, m_ok[:, None], EVEN_M, UPCAST)
            do = _load_operand(do_ptrs, m_ok[:, None], EVEN_M, UPCAST)
            if EVEN_M:
                lse2 = tl.load(Lse + pid_bh * LQ + offs_m)
                delta = tl.load(Delta + pid_bh * LQ + offs_m)
            else:  # rows past LQ: lse = inf -> P = 0
                lse2 = tl.load(Lse + pid_bh * LQ + offs_m, mask=m_ok, other=float("inf"))
                delta = tl.load(Delta + pid_bh * LQ + offs_m, mask=m_ok, other=0.0)
            qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * sm_scale2  # (BLOCK_N, BLOCK_M)
            if CAUSAL or HAS_KPM or (not EVEN_N) or HAS_EM:
                valid = key_ok[:, None]
                if CAUSAL:
                    valid = valid & ((offs_m[None, :] + causal_off) >= offs_n[:, None])
                if HAS_EM:
                    keep = tl.trans(_elem_keep(em_head, offs_m, start_n, stride_em, BLOCK_M, BLOCK_N))
                    valid = valid & (keep != 0)
                qkt = tl.where(valid, qkt, float("-inf"))
            pt = tl.exp2(qkt - lse2[None, :])
            ptc = pt.to(DV.dtype.element_ty)
            if UPCAST:
                ptc = ptc.to(tl.float32)
            dv += tl.dot(ptc, do, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dst = dst.to(DK.dtype.element_ty)
            if UPCAST:
                dst = dst.to(tl.float32)
            dk += tl.dot(dst, q, input_precision=DOT_PREC)
        dk = dk * sm_scale
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ======================================================================================
# 2. Tile configuration and launch wrappers
# ======================================================================================
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M/BLOCK_N are clipped to block_size.
# Chosen on an H100 (see docs/perf.md, "v2"); fp32 uses smaller tiles (register/smem budget).
_FWD_CFG = {
    # head_dim: (16-bit config, fp32 config)
    16: ((64, 128, 4, 3), (64, 32, 4, 2)),
    32: ((64, 128, 4, 3), (64, 32, 4, 2)),
    64: ((64, 128, 4, 3), (64, 32, 4, 2)),
    128: ((128, 64, 4, 3), (64, 32, 4, 2)),
}
_BWD_DQ_CFG = {
    16: ((64, 64, 4, 3), (64, 32, 4, 2)),
    32: ((64, 64, 4, 3), (64, 32, 4, 2)),
    64: ((64, 64, 4, 3), (64, 32, 4, 2)),
    128: ((64, 64, 4, 2), (32, 32, 4, 2)),
}
_BWD_DKV_CFG = {
    16: ((32, 64, 4, 4), (32, 64, 4, 2)),
    32: ((32, 64, 4, 4), (32, 64, 4, 2)),
    64: ((32, 64, 4, 4), (32, 64, 4, 2)),
    128: ((64, 128, 8, 2), (32, 32, 4, 2)),
}


def _pick(table, D, dtype, bs, override=None):
    if override is not None:
        bm, bn, w, s = override
    elif _INTERPRET:
        # interpreter: numpy ops are vectorised, so fewer/larger tiles are faster
        bm, bn, w, s = bs, bs, 4, 1
    else:
        bm, bn, w, s = table[D][0 if dtype != torch.float32 else 1]
    bm, bn = min(bm, bs), min(bn, bs)
    if bs % bm or bs % bn or bm < 16 or bn < 16:
        raise ValueError(f"tile ({bm}, {bn}) must divide block_size={bs} and be >= 16")
    return bm, bn, w, s


def _dot_precision(dtype):
    if dtype == torch.float32:
        # fp32 follows torch's matmul policy: IEEE unless TF32 matmuls are allowed globally
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored for 16-bit inputs


def _check_triton_usable(t: torch.Tensor):
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' requires the 'triton' package, which is not installed; use backend='torch'")
    if t.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing kernels "
            f"(got tensors on {t.device})"
        )


def _kpm_arg(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0, False  # dummy pointer, never read
    kpm = key_padding_mask.to(device=q.device, dtype=torch.uint8).contiguous()
    return kpm, kpm.stride(0), True


def _em_arg(element_mask, q):
    """(pointer, head stride, row stride, has) of a PackedMask (None: a dummy pointer, never read)."""
    if element_mask is None:
        return q, 0, 0, False
    bits = element_mask.bits
    H = q.shape[1]
    stride_eh = 0 if (element_mask.n_heads == 1 and H != 1) else bits.stride(0)
    return bits, stride_eh, bits.stride(1), True


def _triton_forward(q, k, v, lut: LayoutLUT, key_padding_mask, causal, phantom, sm_scale, block_size,
                    out=None, lse=None, cfg=None, element_mask=None):
    """Launch the forward kernel. ``out``/``lse`` may be preallocated (tests poison them).
    ``element_mask``: a PackedMask on q's device, or None."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    bs = block_size
    bm, bn, warps, stages = _pick(_FWD_CFG, D, q.dtype, bs, cfg)
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((B, H, LQ), device=q.device, dtype=torch.float32)
    kpm, stride_pb, has_kpm = _kpm_arg(key_padding_mask, q)
    em, stride_eh, stride_em, has_em = _em_arg(element_mask, q)
    upcast = _INTERPRET and q.dtype == torch.bfloat16
    grid = (triton.cdiv(LQ, bm), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, kpm, em,
        lut.row_ptr, lut.col_idx,
        sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_pb, stride_eh, stride_em,
        H, LQ, LK, lut.nbq, lut.nbk, 0 if lut.n_layout_heads == 1 else 1, LK - LQ,
        BS=bs, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D,
        CAUSAL=bool(causal), HAS_KPM=has_kpm, HAS_EM=has_em, PHANTOM=bool(phantom),
        EVEN_M=(LQ % bs == 0), EVEN_N=(LK % bs == 0),
        DOT_PREC=_dot_precision(q.dtype), UPCAST=upcast,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _triton_backward(do, q, k, v, out, lse, lut: LayoutLUT, key_padding_mask, causal, sm_scale, block_size,
                     dq=None, dk=None, dv=None, delta=None, cfg_dq=None, cfg_dkv=None, element_mask=None):
    """Launch the dQ kernel (which also writes delta) then the dK/dV kernel."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    bs = block_size
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    delta = torch.empty((B, H, LQ), device=q.device, dtype=torch.float32) if delta is None else delta
    kpm, stride_pb, has_kpm = _kpm_arg(key_padding_mask, q)
    em, stride_eh, stride_em, has_em = _em_arg(element_mask, q)
    upcast = _INTERPRET and q.dtype == torch.bfloat16
    prec = _dot_precision(q.dtype)
    even_m, even_n = LQ % bs == 0, LK % bs == 0
    lut_hs = 0 if lut.n_layout_heads == 1 else 1

    bm, bn, warps, stages = _pick(_BWD_DQ_CFG, D, q.dtype, bs, cfg_dq)
    _bwd_dq_kernel[(triton.cdiv(LQ, bm), B * H)](
        q, k, v, out, do, lse, delta, dq, kpm, em,
        lut.row_ptr, lut.col_idx,
        sm_scale, sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(),
        stride_pb, stride_eh, stride_em,
        H, LQ, LK, lut.nbq, lut_hs, LK - LQ,
        BS=bs, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D,
        CAUSAL=bool(causal), HAS_KPM=has_kpm, HAS_EM=has_em, EVEN_N=even_n, DOT_PREC=prec, UPCAST=upcast,
        num_warps=warps, num_stages=stages,
    )
    bm, bn, warps, stages = _pick(_BWD_DKV_CFG, D, q.dtype, bs, cfg_dkv)
    _bwd_dkdv_kernel[(triton.cdiv(LK, bn), B * H)](
        q, k, v, do, lse, delta, dk, dv, kpm, em,
        lut.col_ptr, lut.row_idx,
        sm_scale, sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        stride_pb, stride_eh, stride_em,
        H, LQ, LK, lut.nbk, lut_hs, LK - LQ,
        BS=bs, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D,
        CAUSAL=bool(causal), HAS_KPM=has_kpm, HAS_EM=has_em, EVEN_M=even_m, EVEN_N=even_n,
        DOT_PREC=prec, UPCAST=upcast,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv, delta


# ======================================================================================
# 3. autograd.Function
# ======================================================================================
class _BlockSparseAttention(torch.autograd.Function):
    """Returns ``(out, lse)``; lse (base 2, ``+inf`` on rows with no kept entry) is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, lut, key_padding_mask, causal, phantom, sm_scale, block_size, element_mask):
        out, lse = _triton_forward(q, k, v, lut, key_padding_mask, causal, phantom, sm_scale, block_size,
                                   element_mask=element_mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lut = lut
        ctx.kpm = key_padding_mask
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        ctx.block_size = block_size
        ctx.element_mask = element_mask
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, _ = _triton_backward(
            do, q, k, v, out, lse, ctx.lut, ctx.kpm, ctx.causal, ctx.sm_scale, ctx.block_size,
            element_mask=ctx.element_mask,
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def _uniform_fallback(out, empty, v, key_padding_mask, causal):
    """``empty_rows="uniform"``: rows flagged in ``empty`` (B, H, Lq) get the mean of v over their valid keys
    (real, and ``j <= i + Lk - Lq`` when causal); differentiable in v (autograd), constant in q and k.

    Cost: O(B*H*Lk*D) (a sum, or a prefix sum when causal) in fp32 (fp64 for fp64 inputs)."""
    B, H, LQ, _ = out.shape
    LK = v.shape[2]
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    w = (torch.ones(B, LK, device=v.device, dtype=ct) if key_padding_mask is None
         else key_padding_mask.to(device=v.device, dtype=ct))
    vw = v.to(ct) * w[:, None, :, None]
    if not causal:
        n = w.sum(-1)  # (B,)
        fb = (vw.sum(2) / n.clamp_min(1.0)[:, None, None])[:, :, None, :]  # (B, H, 1, D)
    else:
        cs = vw.cumsum(2)  # (B, H, LK, D): prefix sums of the real keys
        cnt = w.cumsum(-1)  # (B, LK)
        last = torch.arange(LQ, device=v.device) + (LK - LQ)  # last visible key of each row
        seen = last >= 0
        idx = last.clamp_min(0)
        fb = cs[:, :, idx] / cnt[:, idx].clamp_min(1.0)[:, None, :, None]  # (B, H, LQ, D)
        fb = fb * seen[None, None, :, None]
    return torch.where(empty[..., None], fb.to(out.dtype), out)


# ======================================================================================
# 4. Plain PyTorch reference (CPU path and test oracle)
# ======================================================================================
_REF_CHUNK_ELEMS = 1 << 24  # scores per query chunk (64 MiB in fp32)


def _ref_chunk(q_c, k, v, mask_c, n_kept_c, LK, phantom, sm_scale):
    """One query chunk. q_c (B,H,c,D); mask_c (B or 1, H or 1, c, LK) bool; n_kept_c (1, 1|H, c, 1).
    Returns the output chunk and the rows with no kept entry (B, H, c)."""
    s = torch.matmul(q_c, k.transpose(-1, -2)) * sm_scale
    s = s.masked_fill(~mask_c, float("-inf"))
    mx = s.amax(-1, keepdim=True).detach()  # the result is invariant to this shift
    if phantom:
        mx = mx.clamp_min(0.0)  # running max starts at the phantom logit 0
    else:
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)  # masked entries: exp(-inf) = 0, and zero gradient
    den = e.sum(-1, keepdim=True)
    if phantom:
        den = den + (LK - n_kept_c).to(den.dtype) * torch.exp(-mx)
    empty = den <= 0
    den = torch.where(empty, torch.ones_like(den), den)  # empty row -> output exactly 0
    return torch.matmul(e / den, v), empty.squeeze(-1)


def block_sparse_attention_reference(q, k, v, layout, *, block_size=64, causal=False, key_padding_mask=None,
                                     softmax_mode="renorm", sm_scale=None, element_mask=None, empty_rows="zero"):
    """Plain PyTorch block-sparse attention, computed by query-block chunks.

    Differentiable through ordinary autograd; when gradients are needed each chunk runs under
    ``torch.utils.checkpoint`` so the saved activations stay O(chunk * Lk), never B*H*Lq*Lk.
    Computes in fp32 (fp64 for fp64 inputs) and returns q's dtype.  ``element_mask``: bool
    (H or 1, Lq, Lk) or a PackedMask.  No input validation (see :func:`block_sparse_attention`).
    """
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    bs = block_size
    phantom = softmax_mode == "phantom_zero"
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    lay = layout.to(q.device)
    colmask = lay.repeat_interleave(bs, dim=2)[:, :, :LK]  # (Hl, nbq, LK): kept keys per query block
    n_kept = colmask.sum(-1)  # (Hl, nbq): |K_i| (phantom mode: no causal, no element mask)
    em = None
    if element_mask is not None:
        em = (element_mask.unpack() if isinstance(element_mask, PackedMask) else element_mask).to(q.device)
    kpm = None if key_padding_mask is None else key_padding_mask.to(q.device)[:, None, None, :]
    rows_per_chunk = max(bs, (_REF_CHUNK_ELEMS // max(1, B * H * LK)) // bs * bs)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    keys = torch.arange(LK, device=q.device)
    outs, empties = [], []
    for r0 in range(0, LQ, rows_per_chunk):
        r1 = min(LQ, r0 + rows_per_chunk)
        rows = torch.arange(r0, r1, device=q.device)
        rb = rows // bs
        m = colmask[:, rb, :]  # (Hl, c, LK)
        if causal:
            m = m & (keys[None, None, :] <= rows[None, :, None] + (LK - LQ))  # bottom-right aligned
        if em is not None:
            m = m & em[:, r0:r1, :]  # (max(Hl, Hm), c, LK)
        m = m.unsqueeze(0)  # (1, Hl, c, LK)
        if kpm is not None:
            m = m & kpm
        nk = n_kept[:, rb].unsqueeze(-1).unsqueeze(0)  # (1, Hl, c, 1)
        args = (qc[:, :, r0:r1], kc, vc, m, nk, LK, phantom, sm_scale)
        if need_grad:
            o, e = checkpoint(_ref_chunk, *args, use_reentrant=False)
        else:
            o, e = _ref_chunk(*args)
        outs.append(o)
        empties.append(e.expand(B, H, r1 - r0))
    out = torch.cat(outs, dim=2)
    if empty_rows == "uniform":
        out = _uniform_fallback(out, torch.cat(empties, dim=2), vc, key_padding_mask, causal)
    return out.to(q.dtype)


# ======================================================================================
# 5. Public entry point
# ======================================================================================
def _is_bool(x) -> bool:
    return isinstance(x, bool)


def _validate(q, k, v, layout, block_size, causal, key_padding_mask, softmax_mode, sm_scale, backend,
              element_mask, empty_rows):
    E = KernelArgumentError
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise E(f"{name}: expected a torch.Tensor of shape (B, H, L, D), got {describe(t)}")
        if t.dim() != 4:
            raise E(f"{name}: expected 4 dims (B, H, L, D), got shape {tuple(t.shape)}")
    B, H, LQ, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or v.shape != k.shape:
        raise E(
            f"k, v: expected shape ({B}, {H}, Lk, {D}) (q's B, H and D; the same Lk for both), "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    LK = k.shape[2]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise E(f"k, v: expected the same dtype as q ({q.dtype}), got k {k.dtype} and v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise E(f"k, v: expected the same device as q ({q.device}), got k {k.device} and v {v.device}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise E(f"backend: expected one of {BACKENDS}, got {describe(backend)}")
    allowed = _TRITON_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if q.dtype not in allowed:
        raise E(f"q: expected dtype in {allowed} (float64 only with backend='torch'), got {q.dtype}")
    if LQ < 1 or LK < 1 or B < 1 or H < 1:
        raise E(f"q, k: expected B, H, Lq, Lk >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise E(f"q: expected head dim D in {SUPPORTED_HEAD_DIMS}, got {D}")
    if _is_bool(block_size) or not isinstance(block_size, int) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise E(f"block_size: expected an int in {SUPPORTED_BLOCK_SIZES}, got {describe(block_size)}")
    if not _is_bool(causal):
        raise E(f"causal: expected True or False, got {describe(causal)}")
    if not isinstance(softmax_mode, str) or softmax_mode not in SOFTMAX_MODES:
        raise E(f"softmax_mode: expected one of {SOFTMAX_MODES}, got {describe(softmax_mode)}")
    if not isinstance(empty_rows, str) or empty_rows not in EMPTY_ROWS:
        raise E(f"empty_rows: expected one of {EMPTY_ROWS}, got {describe(empty_rows)}")
    if softmax_mode == "phantom_zero":
        if causal:
            raise E("softmax_mode: 'phantom_zero' does not support causal=True (SPION's kernel is non-causal)")
        if element_mask is not None:
            raise E("softmax_mode: 'phantom_zero' does not support an element_mask (use 'renorm')")
        if empty_rows != "zero":
            raise E("empty_rows: 'uniform' needs softmax_mode='renorm' (phantom_zero has no empty rows)")
    if sm_scale is not None and (_is_bool(sm_scale) or not isinstance(sm_scale, numbers.Real)
                                 or not math.isfinite(sm_scale)):
        raise E(f"sm_scale: expected a finite float or None, got {describe(sm_scale)}")
    nbq, nbk = math.ceil(LQ / block_size), math.ceil(LK / block_size)
    validate_layout(layout, H, nbq, nbk)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise E(f"key_padding_mask: expected a bool tensor of shape ({B}, {LK}) (True = real token), "
                    f"got {describe(key_padding_mask)}")
        if tuple(key_padding_mask.shape) != (B, LK):
            raise E(f"key_padding_mask: expected shape ({B}, {LK}) (B, Lk), got {tuple(key_padding_mask.shape)}")
    if element_mask is not None:
        if isinstance(element_mask, PackedMask):
            shape, dev = element_mask.shape, element_mask.device
            if dev != q.device:
                raise E(f"element_mask: packed on {dev} but q is on {q.device}; "
                        f"use pack_element_mask(mask, device=q.device) once per layer")
        elif isinstance(element_mask, torch.Tensor) and element_mask.dtype == torch.bool and element_mask.dim() == 3:
            shape = tuple(element_mask.shape)
        else:
            raise E(f"element_mask: expected a bool tensor of shape ({H} or 1, {LQ}, {LK}) (True = keep) or a "
                    f"PackedMask, got {describe(element_mask)}")
        if shape[0] not in (1, H) or shape[1] != LQ or shape[2] != LK:
            raise E(f"element_mask: expected shape ({H} or 1, {LQ}, {LK}) (H, Lq, Lk), got {tuple(shape)}")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend :func:`block_sparse_attention` runs for ``backend`` and inputs like ``q``: ``"auto"`` is
    ``"triton"`` on CUDA (when Triton is installed), else ``"torch"``.  Callers that keep a layout in two places
    use it to pick one: the Triton path reads the layout on the host on every call (a CPU layout never syncs),
    the torch reference computes with it on q's device."""
    if backend == "auto":
        return "triton" if (q.is_cuda and HAS_TRITON) else "torch"
    return backend


def block_sparse_attention(q, k, v, layout, *, block_size=64, causal=False, key_padding_mask=None,
                           softmax_mode="renorm", sm_scale=None, backend="auto", element_mask=None,
                           empty_rows="zero"):
    """Block-sparse attention; see the module docstring for the exact semantics.

    ``q`` (B, H, Lq, D), ``k, v`` (B, H, Lk, D), ``layout`` bool (H or 1, ceil(Lq/bs), ceil(Lk/bs)) (on any
    device; a CPU layout never syncs), ``causal`` a bool (bottom-right aligned when Lq != Lk),
    ``key_padding_mask`` bool (B, Lk), ``element_mask`` bool (H or 1, Lq, Lk) keep-mask or a
    :class:`kernels.masks.PackedMask` (pack it once per layer: a bool tensor is packed on every call),
    ``empty_rows`` ``"zero"`` or ``"uniform"`` (AP's fidelity fallback for fully pruned rows).

    Returns a tensor with q's shape and dtype.  ``backend``: ``"triton"`` (CUDA, or CPU under
    TRITON_INTERPRET=1), ``"torch"`` (chunked reference), ``"auto"`` (triton on CUDA else torch).
    Bad arguments raise :class:`kernels.errors.KernelArgumentError` (a ValueError and a TypeError) with a
    one-line message naming the argument.
    """
    _validate(q, k, v, layout, block_size, causal, key_padding_mask, softmax_mode, sm_scale, backend,
              element_mask, empty_rows)
    D = q.shape[-1]
    sm_scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    backend = resolve_backend(backend, q)
    if backend == "torch":
        return block_sparse_attention_reference(
            q, k, v, layout, block_size=block_size, causal=causal, key_padding_mask=key_padding_mask,
            softmax_mode=softmax_mode, sm_scale=sm_scale, element_mask=element_mask, empty_rows=empty_rows,
        )
    _check_triton_usable(q)
    LQ, LK = q.shape[2], k.shape[2]
    lut = get_lut(layout, causal, q.device, lq=LQ, lk=LK, block_size=block_size)
    em = None if element_mask is None else pack_element_mask(element_mask, device=q.device)
    out, lse = _BlockSparseAttention.apply(
        q, k, v, lut, key_padding_mask, causal, softmax_mode == "phantom_zero", sm_scale, block_size, em
    )
    if empty_rows == "uniform":
        out = _uniform_fallback(out, torch.isinf(lse), v, key_padding_mask, causal)
    return out

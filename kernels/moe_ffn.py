"""
Expert-parallel ReLU FFN for dynamic per-token expert sets (DSTI / D2DMoE, MoEfication split)
=============================================================================================

Semantics
---------
A dense FFN ``y = W2 relu(W1 x + b1) + b2`` with ``W1 (d_ff, d_model)``, ``b1 (d_ff,)``,
``W2 (d_model, d_ff)``, ``b2 (d_model,)`` (``nn.Linear`` layouts) is cut into ``E`` experts of
``d_e = d_ff / E`` hidden units.  Expert ``e`` owns the hidden units ``J_e = perm[e*d_e:(e+1)*d_e]``
(``perm`` from the clustering of spec dsti.md §2.4; ``perm=None`` means the weights are already
stored in expert order, ``J_e = e*d_e .. (e+1)*d_e - 1``).  For tokens ``x (T, d_model)`` and a bool
selection ``sel (T, E)`` (any number of experts per token, zero included)::

    y[t] = b2 + sum_{e : sel[t, e]} W2[:, J_e] @ relu(W1[J_e] @ x[t] + b1[J_e])

Unit weights, ``b2`` exactly once per token (a token with no expert gets ``b2``); with every expert
selected it is the dense FFN (the split identity, spec U1), for any ``perm``.  Leading dimensions are
allowed: ``x (..., d_model)`` with ``sel (..., E)``.  Forward only (inference; the router stage trains
with dense execution): the Triton path refuses inputs that require a gradient.

Precision: fp32 accumulation everywhere; the hidden activation ``h`` is stored in the input dtype
between the two GEMMs (as a dense bf16 FFN does, ``F.linear`` returns bf16), the output in the input
dtype.  fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set (the
same policy as torch matmul).

Algorithm (``backend="triton"``: CUDA, or CPU under ``TRITON_INTERPRET=1``)
-------------------------------------------------------------------------
Notation: ``P`` (token, expert) pairs selected, ``D = d_model``, ``e`` bytes per element.

1. Dispatch metadata, no host sync (:func:`moe_dispatch`): ``_moe_count_kernel`` (one program per block
   of tokens) writes per-block expert counts, one ``torch.cumsum`` over blocks, then
   ``_moe_dispatch_kernel`` (same blocks) ranks each block's tokens per expert and writes the expert
   counts and offsets (exclusive cumsum), ``pair_index[t, e]`` (the pair's row in the expert-grouped
   order, or -1) and ``pair_token[row] = t``.  Rows are grouped by expert, tokens ascending inside an
   expert: stable and deterministic.  Up to 128 tokens it is the dispatch kernel alone (one launch).
   Reads ``T*E`` bytes of ``sel``, writes ``8*T*E`` bytes of int32 indices (0.04 ms at 32k x 128, H200).
2. ``_moe_up_kernel`` (gathered grouped GEMM 1): a persistent grid walks the tiles of BLOCK_M rows of
   every expert (the tile table is derived in-kernel from the counts, so the grid needs no host sync);
   each tile gathers its tokens' rows of ``x`` by ``pair_token`` and computes
   ``h = relu(x_g @ W1[J_e]^T + b1[J_e])`` in fp32, stored in the input dtype.
   ``2*P*D*d_e`` FLOPs; reads ``e*P*D`` bytes of gathered ``x`` (a token row is read once per expert it
   uses: served by L2 while ``x`` fits there) and ``W1`` once per row tile; writes ``e*P*d_e``.
   Its arithmetic intensity to the gathered ``x`` is only ``d_e`` FLOP/byte (24 for BERT-base's 128
   experts): why FLOP savings do not turn into time 1:1 (spec pitfall 9; docs/perf.md has the numbers).
3. Combine, deterministic (no atomics, a fixed summation order), two implementations (``combine=``):

   * ``"hidden"`` (default and "auto"; no host sync, CUDA-graph safe): GEMM 1 scatters each pair's
     ``d_e`` values into its own segment ``[t, e*d_e:(e+1)*d_e]`` of a zero-filled token-major hidden
     ``(T, d_ff)`` (the buffer a dense FFN allocates; disjoint segments, so no collision), then
     ``y = F.linear(hidden, W2, b2)``: one dense GEMM (cuBLAS on CUDA; fp32 accumulation, ``b2`` once).
     Zero-fill ``2*e*T*d_ff`` bytes; GEMM 2 executes the dense ``2*T*d_ff*D`` FLOPs, zeros included.
   * ``"pairs"`` (the literal grouped GEMM 2, all Triton; one host sync to size the partials):
     ``_moe_down_pairs_kernel`` computes ``h @ W2[:, J_e]^T`` per expert tile into fp32 per-pair partials
     ``(P, D)`` (exactly ``2*P*d_e*D`` FLOPs), then ``_moe_combine_kernel`` sums, for each token, its
     partials in expert order, plus ``b2``.  Moves ``8*P*D`` bytes of partials (written, then read):
     with ``d_e = 24`` that is 6 FLOP per partial byte, HBM-bound.

   Why not a Triton GEMM 2 that skips unselected experts on the fly: any token-major tile of >= 16 tokens
   with independent per-token selections uses nearly every expert (``1 - (1-f)^16``), so such a kernel
   executes dense GEMM-2 FLOPs anyway, and gathering the sparse hidden per element cost 10-30x cuBLAS
   (measured, docs/perf.md); the per-pair partials of "pairs" never beat "hidden" in the H200 sweep
   (best 1.61x vs 1.75x over dense, BERT-base, d_e = 96, 32k tokens, 5 % of the experts).

Cost convention (:func:`moe_ffn_flops`, spec §2.7): per pair ``4*D*d_e`` GEMM FLOPs (multiply and add
counted; fvcore's "flops" are half, MACs) plus ``d_e`` for ``b1``; per token ``D`` for ``b2``; ReLU
costs 0.  Dense: ``4*D*d_ff + d_ff + D`` per token, so all experts on == dense exactly.  Tile padding
(``d_e = 24`` runs in 32-wide dot tiles) and the zeros that the "hidden" combine's dense GEMM 2
multiplies are not counted: the numbers are the algorithm's (spec §2.7), not the tiles'.

Files: the plain-PyTorch reference :func:`moe_ffn_reference` (CPU path and test oracle), the public
:func:`moe_ffn`, :func:`moe_dispatch`, :func:`moe_ffn_flops`, and the GPU perf sweep
(:func:`run_sweep`, ``python -m kernels.moe_ffn --sweep OUT.json``) comparing dense cuBLAS, this kernel and
``torch._grouped_mm``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from .block_sparse_attention import HAS_TRITON, _INTERPRET, _check_triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "moe_ffn",
    "moe_ffn_reference",
    "moe_dispatch",
    "MoEDispatch",
    "moe_ffn_flops",
    "permute_hidden",
    "SweepConfig",
    "run_sweep",
]

BACKENDS = ("auto", "triton", "torch")
COMBINES = ("auto", "hidden", "pairs")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ======================================================================================
# 1. Kernels
# ======================================================================================
if HAS_TRITON:

    @triton.jit
    def _moe_count_kernel(Sel, BlkCnt, T, E, NBLK, stride_st, stride_se, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
        """Per-block expert counts, expert-major: BlkCnt[e, b] = #{t in block b : sel[t, e]} (int32, (E_PAD, NBLK),
        so that the cumsum over blocks runs along the innermost dim: torch's scan over a leading dim is
        ~50x slower, 6 ms for (32768, 128)).  Reads BLOCK_T * E bytes of the selection, writes 4 * E_PAD."""
        b = tl.program_id(0)
        offs_t = b * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, E_PAD)
        m = (offs_t[:, None] < T) & (offs_e[None, :] < E)
        s = tl.load(Sel + offs_t[:, None] * stride_st + offs_e[None, :] * stride_se, mask=m, other=0)
        tl.store(BlkCnt + offs_e * NBLK + b, tl.sum((s != 0).to(tl.int32), axis=0))

    @triton.jit
    def _moe_dispatch_kernel(Sel, BlkCum, Counts, Offsets, PairIdx, PairTok,
                             T, E, NBLK, stride_st, stride_se, stride_pt,
                             BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, SINGLE: tl.constexpr):
        """Block b: its tokens' ranks per expert, pair_index[t, e] = offsets[e] + rank or -1, and
        pair_token[pair_index] = t.  BlkCum (E_PAD, NBLK) is the inclusive cumsum over blocks of the block
        counts: column b minus block b's own counts = the pairs of earlier blocks, the last column = the expert
        counts (whose exclusive cumsum, the expert offsets, block 0 writes).  SINGLE (one block, T <= BLOCK_T):
        the counts come from the block's own tile, nothing else is launched.  Reads T*E bytes of sel, writes
        8*T*E bytes of int32 indices."""
        b = tl.program_id(0)
        offs_e = tl.arange(0, E_PAD)
        offs_t = b * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (offs_t[:, None] < T) & (offs_e[None, :] < E)
        s = (tl.load(Sel + offs_t[:, None] * stride_st + offs_e[None, :] * stride_se, mask=m, other=0) != 0)
        si = s.to(tl.int32)
        own = tl.sum(si, axis=0)
        if SINGLE:
            total = own
            before = tl.zeros([E_PAD], dtype=tl.int32)
        else:
            total = tl.load(BlkCum + offs_e * NBLK + NBLK - 1)
            before = tl.load(BlkCum + offs_e * NBLK + b) - own
        excl = tl.cumsum(total, axis=0) - total  # expert offsets (exclusive cumsum of the counts)
        if b == 0:
            tl.store(Counts + offs_e, total, mask=offs_e < E)
            tl.store(Offsets + offs_e, excl, mask=offs_e < E)
            tl.store(Offsets + E, tl.sum(total, axis=0))
        rank = tl.cumsum(si, axis=0)  # inclusive rank of t among this block's tokens of e
        pidx = tl.where(s, (excl + before)[None, :] + rank - 1, -1)
        tl.store(PairIdx + offs_t[:, None] * stride_pt + offs_e[None, :], pidx, mask=m)
        tok = offs_t[:, None] + tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
        tl.store(PairTok + pidx, tok, mask=m & s)

    # -- the expert tile table, derived in-kernel from the counts (no host sync, no tile-table tensor)
    @triton.jit
    def _tile_table(Counts, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
        ar_e = tl.arange(0, E_PAD)
        cnt = tl.load(Counts + ar_e, mask=ar_e < E, other=0)
        tpe = (cnt + BLOCK_M - 1) // BLOCK_M  # row tiles per expert
        cum_t = tl.cumsum(tpe, axis=0)  # inclusive
        excl_c = tl.cumsum(cnt, axis=0) - cnt  # expert row offsets
        return ar_e, cnt, tpe, cum_t, excl_c, tl.sum(tpe, axis=0)

    @triton.jit
    def _tile_rows(tile, ar_e, cnt, tpe, cum_t, excl_c, BLOCK_M: tl.constexpr):
        """Tile index -> (expert, its BLOCK_M row indices, end of the expert's rows): vector compares and
        sums over E_PAD lanes, no dependent loads."""
        e = tl.sum((cum_t <= tile).to(tl.int32), axis=0)
        is_e = ar_e == e
        first = tl.sum(tl.where(is_e, cum_t - tpe, 0), axis=0)
        off = tl.sum(tl.where(is_e, excl_c, 0), axis=0)
        c = tl.sum(tl.where(is_e, cnt, 0), axis=0)
        rows = off + (tile - first) * BLOCK_M + tl.arange(0, BLOCK_M)
        return e, rows, off + c

    @triton.jit
    def _moe_up_kernel(X, W1, B1, Hid, PairTok, Counts,
                       stride_xt, stride_xk, stride_wn, stride_wk, stride_ht,
                       E, K,
                       DE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       E_PAD: tl.constexpr, EVEN_K: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
                       DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
        """relu(x[pair_token[row]] . W1[e*DE + n] + b1[e*DE + n]) for the rows of expert e, stored at
        Hid[row, n] (pair-major, (P, DE)) or, TOKEN_MAJOR, at Hid[token, e*DE + n] (the zero-filled (T, d_ff)
        sparse hidden; each pair owns its DE-wide segment, so the scatter never collides).
        Persistent: program p takes tiles p, p + nprog, ...; axis 1 splits d_e into BLOCK_N columns."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        pid_n = tl.program_id(1)
        ar_e, cnt, tpe, cum_t, excl_c, n_tiles = _tile_table(Counts, E, BLOCK_M, E_PAD)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < DE
        offs_k = tl.arange(0, BLOCK_K)
        for tile in range(pid, n_tiles, nprog):
            e, rows, row_end = _tile_rows(tile, ar_e, cnt, tpe, cum_t, excl_c, BLOCK_M)
            r_ok = rows < row_end
            # rows past the expert's end gather token 0 (valid memory); their results are never stored
            tok = tl.load(PairTok + rows, mask=r_ok, other=0).to(tl.int64)
            x_ptrs = X + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk
            w_ptrs = W1 + (e * DE + offs_n)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    a = tl.load(x_ptrs)
                    b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = (k0 + offs_k) < K
                    a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
            bias = tl.load(B1 + e * DE + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            h = tl.maximum(acc + bias[None, :], 0.0)
            if TOKEN_MAJOR:
                h_ptrs = Hid + tok[:, None] * stride_ht + (e * DE + offs_n)[None, :]
            else:
                h_ptrs = Hid + rows.to(tl.int64)[:, None] * DE + offs_n[None, :]
            tl.store(h_ptrs, h.to(Hid.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_down_pairs_kernel(Hid, W2, Part, Counts, stride_wn, stride_wk, E, N,
                               DE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_DE: tl.constexpr, EVEN_DE: tl.constexpr, E_PAD: tl.constexpr,
                               DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
        """Grouped GEMM 2: part[row] = h[row] @ W2[:, J_e]^T (fp32 per-pair partials, 4*N bytes a row)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        pid_n = tl.program_id(1)
        ar_e, cnt, tpe, cum_t, excl_c, n_tiles = _tile_table(Counts, E, BLOCK_M, E_PAD)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_j = tl.arange(0, BLOCK_DE)
        for tile in range(pid, n_tiles, nprog):
            e, rows, row_end = _tile_rows(tile, ar_e, cnt, tpe, cum_t, excl_c, BLOCK_M)
            r_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for j0 in tl.static_range(0, DE, BLOCK_DE):
                offs = j0 + offs_j
                w_ptrs = W2 + offs_n[None, :] * stride_wn + (e * DE + offs)[:, None] * stride_wk
                if EVEN_DE:
                    a = tl.load(Hid + rows64[:, None] * DE + offs[None, :], mask=r_ok[:, None], other=0.0)
                    b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    j_ok = offs < DE
                    a = tl.load(Hid + rows64[:, None] * DE + offs[None, :], mask=r_ok[:, None] & j_ok[None, :],
                                other=0.0)
                    b = tl.load(w_ptrs, mask=j_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            tl.store(Part + rows64[:, None] * N + offs_n[None, :], acc, mask=r_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_combine_kernel(Part, B2, Y, PairIdx, stride_yt, stride_yn, stride_pt, T, N, E,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[t] = b2 + sum_{e=0..E-1, sel[t,e]} part[pair_index[t, e]]: a segmented sum in expert order."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for e in range(0, E):
            idx = tl.load(PairIdx + offs_m * stride_pt + e, mask=m_ok, other=-1)
            p_ptrs = Part + tl.maximum(idx, 0).to(tl.int64)[:, None] * N + offs_n[None, :]
            acc += tl.load(p_ptrs, mask=(idx >= 0)[:, None] & n_ok[None, :], other=0.0)
        bias = tl.load(B2 + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        y_ptrs = Y + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, (acc + bias[None, :]).to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ======================================================================================
# 2. Dispatch metadata
# ======================================================================================
@dataclass(frozen=True)
class MoEDispatch:
    """Where every selected (token, expert) pair goes; all int32 tensors on ``sel``'s device.

    * ``counts (E,)``: tokens per expert.
    * ``offsets (E+1,)``: exclusive cumsum of ``counts``; ``offsets[E]`` = number of pairs ``P``.
    * ``pair_token (T*E,)``: ``pair_token[offsets[e] + r]`` = the r-th token (ascending) that selected e;
      entries from ``P`` on are unspecified (capacity ``T*E`` so that no host sync is needed).
    * ``pair_index (T, E)``: the row of pair (t, e) in that order, -1 where ``sel[t, e]`` is False.
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    pair_token: torch.Tensor
    pair_index: torch.Tensor

    def n_pairs(self) -> int:
        """Number of selected pairs (a host sync)."""
        return int(self.offsets[-1])


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _dispatch_torch(sel: torch.Tensor) -> MoEDispatch:
    T, E = sel.shape
    s = sel.t().contiguous()  # (E, T): scans over the innermost dim (a leading-dim scan is far slower on CUDA)
    si = s.to(torch.int32)
    counts = si.sum(1, dtype=torch.int32)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=sel.device)
    offsets[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    rank = torch.cumsum(si, 1, dtype=torch.int32)  # inclusive rank of t among expert e's tokens
    pair_index = torch.where(s, rank + offsets[:-1, None] - 1, torch.full_like(rank, -1)).t().contiguous()
    # scatter t into its row; unselected pairs go to a dump slot past the end (never read)
    buf = torch.empty(T * E + 1, dtype=torch.int32, device=sel.device)
    dest = torch.where(sel, pair_index, torch.full_like(pair_index, T * E)).reshape(-1).long()
    src = torch.arange(T, dtype=torch.int32, device=sel.device)[:, None].expand(T, E).reshape(-1)
    buf.scatter_(0, dest, src)
    return MoEDispatch(counts, offsets, buf[: T * E], pair_index)


def _dispatch_triton(sel: torch.Tensor, block_t=None, warps=None, parts=None) -> MoEDispatch:
    """One launch for T <= BLOCK_T (single block); otherwise block counts, a cumsum over blocks, ranks.
    ``block_t``/``warps``: tile overrides (profiling); ``parts``: a list that gets the launch closures."""
    T, E = sel.shape
    dev = sel.device
    e_pad = max(16, _np2(E))
    bt = block_t or max(16, min(128, _np2(T), max(16, 16384 // e_pad)))
    nblk = triton.cdiv(T, bt)
    s8 = sel.view(torch.uint8)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    pair_index = torch.empty(T, E, dtype=torch.int32, device=dev)
    pair_token = torch.empty(T * E, dtype=torch.int32, device=dev)
    warps = warps or (8 if bt * e_pad >= 8192 else 4)
    if nblk > 1:
        blk = torch.empty(e_pad, nblk, dtype=torch.int32, device=dev)
        _moe_count_kernel[(nblk,)](s8, blk, T, E, nblk, s8.stride(0), s8.stride(1), BLOCK_T=bt, E_PAD=e_pad,
                                   num_warps=warps)
        cum = torch.cumsum(blk, 1, dtype=torch.int32)  # (E_PAD, nblk), over the innermost dim: one fast scan
    else:
        cum = counts  # not read
    _moe_dispatch_kernel[(nblk,)](s8, cum, counts, offsets, pair_index, pair_token, T, E, nblk,
                                  s8.stride(0), s8.stride(1), pair_index.stride(0),
                                  BLOCK_T=bt, E_PAD=e_pad, SINGLE=nblk == 1, num_warps=warps)
    return MoEDispatch(counts, offsets, pair_token, pair_index)


def moe_dispatch(sel: torch.Tensor, backend: str = "auto") -> MoEDispatch:
    """Dispatch metadata of a bool selection ``sel (T, E)`` (see :class:`MoEDispatch`); no host sync.
    ``backend``: "triton" (one kernel up to 128 tokens, else two and a cumsum), "torch" (about a dozen
    ops), "auto" (triton on CUDA)."""
    if not isinstance(sel, torch.Tensor) or sel.dtype != torch.bool or sel.dim() != 2:
        raise ValueError("sel: expected a 2-dim bool tensor (T, E)")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if (sel.is_cuda and HAS_TRITON) else "torch"
    if sel.shape[0] == 0 or sel.shape[1] == 0:
        backend = "torch"
    if backend == "triton":
        _check_triton_usable(sel)
        return _dispatch_triton(sel)
    return _dispatch_torch(sel)


# ======================================================================================
# 3. Launch wrappers
# ======================================================================================
@functools.lru_cache(maxsize=None)
def _n_sm(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dot_prec(dtype):
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored for 16-bit inputs


def _block_de(de: int) -> int:
    """K tile of the per-expert GEMM 2 ("pairs") over d_e: a power of two >= 16 dividing d_e when one
    does (48 -> 16, 96 -> 32: no masked lanes), else a covering tile (24 -> 32, a quarter masked)."""
    for b in (64, 32, 16):
        if de % b == 0:
            return b
    return min(64, max(16, _np2(de)))


@dataclass(frozen=True)
class _Tiles:
    bm1: int  # expert-tile kernels: rows (tokens of one expert) per tile
    bk1: int
    bn1: int  # GEMM 1 hidden columns per program (covers d_e up to 128)
    w1: int
    s1: int
    nprog: int  # persistent programs of the expert-tile kernels
    bde: int  # "pairs" GEMM 2: K tile over d_e
    bn3: int  # "pairs" GEMM 2 output columns


def _tiles(T: int, D: int, de: int, cuda: bool, n_sm: int) -> _Tiles:
    """GEMM 1's row tiles hold the tokens of one expert (about f*T of them).  Measured on an H200
    (docs/perf.md): 64 rows and 4 stages best from ~1k tokens on, 16-32 rows below.  The interpreter gets
    small tiles (it runs every program in numpy)."""
    bn1 = min(128, max(16, _np2(de)))
    bde = _block_de(de)
    if not cuda:
        return _Tiles(16, 32, bn1, 4, 1, 3, bde, 32)
    bm1 = 16 if T <= 64 else (32 if T <= 512 else 64)
    return _Tiles(bm1, 64, bn1, 4, 4, 4 * n_sm, bde, 64)


def _launch_up(x, W1, b1, disp, E, tl_cfg, prec, upcast, hidden=None, cap=0):
    """GEMM 1 into ``hidden`` (the zero-filled (T, d_ff) token-major hidden) if given, else into a new
    pair-major ``(cap, d_e)`` buffer."""
    T, D = x.shape
    de = W1.shape[0] // E
    token_major = hidden is not None
    h = hidden if token_major else torch.empty(cap, de, dtype=x.dtype, device=x.device)
    nprog = max(1, min(tl_cfg.nprog, E * triton.cdiv(T, tl_cfg.bm1)))
    _moe_up_kernel[(nprog, triton.cdiv(de, tl_cfg.bn1))](
        x, W1, b1, h, disp.pair_token, disp.counts,
        x.stride(0), x.stride(1), W1.stride(0), W1.stride(1), h.stride(0), E, D,
        DE=de, BLOCK_M=tl_cfg.bm1, BLOCK_N=tl_cfg.bn1, BLOCK_K=tl_cfg.bk1, E_PAD=max(16, _np2(E)),
        EVEN_K=D % tl_cfg.bk1 == 0, TOKEN_MAJOR=token_major, DOT_PREC=prec, UPCAST=upcast,
        num_warps=tl_cfg.w1, num_stages=tl_cfg.s1,
    )
    return h


def _launch_down_pairs(h, W2, disp, E, T, tl_cfg, prec, upcast):
    D = W2.shape[0]
    de = h.shape[1]
    part = torch.empty(h.shape[0], D, dtype=torch.float32, device=h.device)
    nprog = max(1, min(tl_cfg.nprog, E * triton.cdiv(T, tl_cfg.bm1)))
    _moe_down_pairs_kernel[(nprog, triton.cdiv(D, tl_cfg.bn3))](
        h, W2, part, disp.counts, W2.stride(0), W2.stride(1), E, D,
        DE=de, BLOCK_M=tl_cfg.bm1, BLOCK_N=tl_cfg.bn3, BLOCK_DE=tl_cfg.bde, EVEN_DE=de % tl_cfg.bde == 0,
        E_PAD=max(16, _np2(E)), DOT_PREC=prec, UPCAST=upcast, num_warps=4, num_stages=tl_cfg.s1,
    )
    return part


def _launch_combine(part, b2, disp, T, E, cuda, out_dtype):
    D = part.shape[1]
    y = torch.empty(T, D, dtype=out_dtype, device=part.device)
    bm, bn = (32, 128) if cuda else (16, 32)
    _moe_combine_kernel[(triton.cdiv(T, bm), triton.cdiv(D, bn))](
        part, b2, y, disp.pair_index, y.stride(0), y.stride(1), disp.pair_index.stride(0), T, D, E,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
    )
    return y


def _moe_ffn_triton(x, W1, b1, W2, b2, sel, E, combine):
    T, D = x.shape
    d_ff = W1.shape[0]
    de = d_ff // E
    cuda = x.is_cuda
    n_sm = _n_sm(x.device.index if x.device.index is not None else torch.cuda.current_device()) if cuda else 1
    cfg = _tiles(T, D, de, cuda, n_sm)
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    prec = _dot_prec(x.dtype)
    b1c, b2c = b1.contiguous(), b2.contiguous()
    disp = _dispatch_triton(sel)
    if combine == "pairs":
        h = _launch_up(x, W1, b1c, disp, E, cfg, prec, upcast, cap=max(disp.n_pairs(), 1))  # one host sync
        part = _launch_down_pairs(h, W2, disp, E, T, cfg, prec, upcast)
        return _launch_combine(part, b2c, disp, T, E, cuda, x.dtype)
    # "hidden": no host sync, CUDA-graph safe; the same (T, d_ff) buffer as a dense FFN's hidden
    hidden = torch.zeros(T, d_ff, dtype=x.dtype, device=x.device)
    _launch_up(x, W1, b1c, disp, E, cfg, prec, upcast, hidden=hidden)
    return F.linear(hidden, W2, b2c)


# ======================================================================================
# 4. Reference, public API, FLOPs
# ======================================================================================
def permute_hidden(W1, b1, W2, perm):
    """Weights in expert order: expert e's units ``perm[e*d_e:(e+1)*d_e]`` become rows/columns
    ``e*d_e .. (e+1)*d_e - 1``.  Do it once at conversion time; ``moe_ffn(perm=...)`` does it per call."""
    perm = perm.to(device=W1.device, dtype=torch.long)
    return W1.index_select(0, perm), b1.index_select(0, perm), W2.index_select(1, perm)


def moe_ffn_reference(x, W1, b1, W2, b2, sel, n_experts, *, perm=None):
    """Plain PyTorch: per expert, gather its tokens, two ``F.linear``, add into an fp32 (fp64 for fp64
    inputs) accumulator in expert order; ``b2`` last.  Deterministic on every device (a token appears
    once per expert, so ``acc[idx] += ...`` never collides).  The CPU path and the test oracle."""
    lead = x.shape[:-1]
    D = x.shape[-1]
    x2, sel2 = x.reshape(-1, D), sel.reshape(-1, n_experts)
    if perm is not None:
        W1, b1, W2 = permute_hidden(W1, b1, W2, perm)
    de = W1.shape[0] // n_experts
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = torch.zeros(x2.shape[0], D, dtype=ct, device=x.device)
    for e in range(n_experts):
        idx = sel2[:, e].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        r = slice(e * de, (e + 1) * de)
        h = torch.relu(F.linear(x2[idx].to(ct), W1[r].to(ct), b1[r].to(ct)))
        h = h.to(x.dtype).to(ct)  # the hidden is held in the input dtype, as in the kernels
        acc[idx] += F.linear(h, W2[:, r].to(ct))
    return (acc + b2.to(ct)).to(x.dtype).reshape(*lead, D)


def _validate(x, W1, b1, W2, b2, sel, n_experts, backend, combine, perm):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine: expected one of {COMBINES}, got {combine!r}")
    for name, t in (("x", x), ("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2), ("sel", sel)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., d_model)")
    D = x.shape[-1]
    if W1.dim() != 2 or W1.shape[1] != D:
        raise ValueError(f"W1: expected shape (d_ff, {D}), got {tuple(W1.shape)}")
    d_ff = W1.shape[0]
    if not isinstance(n_experts, int) or n_experts < 1 or d_ff % n_experts != 0:
        raise ValueError(f"n_experts: expected a positive int dividing d_ff={d_ff}, got {n_experts!r}")
    for name, t, shape in (("b1", b1, (d_ff,)), ("W2", W2, (D, d_ff)), ("b2", b2, (D,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if sel.dtype != torch.bool or tuple(sel.shape) != (*x.shape[:-1], n_experts):
        raise ValueError(f"sel: expected a bool tensor of shape {(*x.shape[:-1], n_experts)}, "
                         f"got {sel.dtype} {tuple(sel.shape)}")
    for name, t in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2), ("sel", sel)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {t.device}")
    for name, t in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
    allowed = _TRITON_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if x.dtype not in allowed:
        raise ValueError(f"x: expected dtype in {allowed}, got {x.dtype}")
    if perm is not None:
        if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.numel() != d_ff:
            raise ValueError(f"perm: expected a 1-dim permutation of length d_ff={d_ff}")


def _resolve_backend(x, backend):
    if backend == "auto":
        backend = "triton" if (x.is_cuda and HAS_TRITON and x.dtype in _TRITON_DTYPES) else "torch"
    if backend == "triton":
        _check_triton_usable(x)
    return backend


def moe_ffn(x, W1, b1, W2, b2, sel, n_experts, backend="auto", *, perm=None, combine="auto"):
    """``y = b2 + sum_{e in sel[t]} W2[:, J_e] relu(W1[J_e] x[t] + b1[J_e])`` (module docstring).

    ``x (..., d_model)``; ``W1 (d_ff, d_model)``, ``b1 (d_ff,)``, ``W2 (d_model, d_ff)``, ``b2 (d_model,)``
    (``nn.Linear`` layouts, any strides); ``sel (..., n_experts)`` bool; ``perm (d_ff,)`` optional hidden
    permutation (expert e owns ``perm[e*d_e:(e+1)*d_e]``; pre-apply it with :func:`permute_hidden` to
    avoid a per-call weight copy).  ``backend``: "auto" (triton on CUDA, torch otherwise), "triton",
    "torch".  ``combine`` (triton only): "hidden" (= "auto": no host sync, the faster one at every point
    of the H200 sweep) or "pairs" (Triton grouped GEMM 2 + segmented combine; one host sync)."""
    _validate(x, W1, b1, W2, b2, sel, n_experts, backend, combine, perm)
    backend = _resolve_backend(x, backend)
    if backend == "torch":
        return moe_ffn_reference(x, W1, b1, W2, b2, sel, n_experts, perm=perm)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, W1, b1, W2, b2)):
        raise NotImplementedError("moe_ffn: the triton backend is forward only (inference); run it under "
                                  "torch.no_grad(), or use backend='torch' (differentiable)")
    if perm is not None:
        W1, b1, W2 = permute_hidden(W1, b1, W2, perm)
    lead, D = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, D)
    sel2 = sel.reshape(-1, n_experts)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, D)
    if not sel2.is_contiguous():
        sel2 = sel2.contiguous()
    y = _moe_ffn_triton(x2, W1, b1, W2, b2, sel2, n_experts, combine)
    return y.reshape(*lead, D)


def moe_ffn_flops(sel, d_model, d_ff, n_experts) -> dict:
    """Exact FLOPs of a selection (module docstring: 4*d_model*d_e + d_e per pair, d_model per token
    for b2, ReLU free) and of the dense FFN on the same tokens (4*d_model*d_ff + d_ff + d_model each).
    Python ints; ``ratio`` = moe / dense.  ``macs``: the GEMM multiply-accumulates (fvcore's "flops")."""
    if d_ff % n_experts != 0:
        raise ValueError(f"n_experts={n_experts} must divide d_ff={d_ff}")
    de = d_ff // n_experts
    sel = sel.reshape(-1, n_experts)
    tokens = int(sel.shape[0])
    pairs = int(sel.sum())
    moe = pairs * (4 * d_model * de + de) + tokens * d_model
    dense = tokens * (4 * d_model * d_ff + d_ff + d_model)
    return {"tokens": tokens, "pairs": pairs, "d_e": de, "moe_flops": moe, "dense_flops": dense,
            "moe_macs": pairs * 2 * d_model * de, "dense_macs": tokens * 2 * d_model * d_ff,
            "ratio": moe / dense if dense else float("nan")}


# ======================================================================================
# 5. Perf sweep (GPU): dense cuBLAS vs this kernel vs torch._grouped_mm, one process
# ======================================================================================
@dataclass(frozen=True)
class SweepConfig:
    tokens: tuple[int, ...] = (1, 16, 256, 1024, 4096, 16384, 32768)
    expert_sizes: tuple[int, ...] = (24, 48, 96)
    models: tuple[tuple[str, int, int], ...] = (("minilm", 384, 1536), ("bert-base", 768, 3072))
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)  # P(sel[t, e]): Bernoulli, ragged per token
    # dense = cuBLAS F.linear x2; moe_triton = combine "hidden"; moe_triton_pairs = combine "pairs"
    kernels: tuple[str, ...] = ("dense", "moe_triton", "moe_triton_pairs", "grouped_mm")
    dtype: str = "bfloat16"
    graphs: bool = True  # also time dense and moe_triton (sync-free) replayed from a CUDA graph
    max_partial_gib: float = 2.0  # skip "pairs" / grouped_mm points whose fp32 per-pair outputs exceed this
    check_tol: float = 2e-2  # relative Frobenius error vs the reference, before timing
    seed: int = 0
    warmup_ms: int = 5
    rep_ms: int = 25


PRESETS = {
    # CPU smoke test: the torch backend at toy sizes (numbers meaningless)
    "tiny": SweepConfig(tokens=(4,), expert_sizes=(8,), models=(("toy", 16, 32),), fractions=(0.5,),
                        kernels=("dense", "moe_torch"), dtype="float32", graphs=False),
    "small": SweepConfig(),
}


def grouped_mm_info() -> dict:
    """Whether this PyTorch has ``torch._grouped_mm`` and its schema (the sweep records it)."""
    if not hasattr(torch, "_grouped_mm"):
        return {"available": False, "schema": None}
    try:
        schema = str(torch.ops.aten._grouped_mm.default._schema)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        schema = f"unknown ({type(exc).__name__})"
    return {"available": True, "schema": schema}


def grouped_mm_ffn(x, W1, b1, W2, b2, sel, n_experts):
    """The same FFN through ``torch._grouped_mm`` (2-D x 3-D with int32 group-end offsets; no bias
    support, so biases are separate ops), index gather and ``index_add_`` (atomic on CUDA: *not*
    deterministic).  One host sync for the number of pairs.  Weights must be in expert order."""
    T, D = x.shape
    E = n_experts
    de = W1.shape[0] // E
    disp = moe_dispatch(sel)
    P = disp.n_pairs()
    if P == 0:
        return b2.expand(T, D).clone()
    tok = disp.pair_token[:P].long()
    ends = disp.offsets[1:]  # int32 group ends
    w1g = W1.view(E, de, D).transpose(1, 2)  # (E, D, de), column-major per group: no copy
    w2g = W2.t().view(E, de, D)  # (E, de, D), column-major per group: no copy
    eid = torch.repeat_interleave(torch.arange(E, device=x.device), disp.counts.long(), output_size=P)
    h = torch._grouped_mm(x.index_select(0, tok), w1g, offs=ends)
    h = torch.relu(h + b1.view(E, de).index_select(0, eid))
    o = torch._grouped_mm(h, w2g, offs=ends)
    y = b2.float().expand(T, D).clone()
    y.index_add_(0, tok, o.float())
    return y.to(x.dtype)


def _dense_ffn(x, W1, b1, W2, b2):
    return F.linear(torch.relu(F.linear(x, W1, b1)), W2, b2)


def _bench(fn, cfg: SweepConfig, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _graphed(fn):
    """Capture ``fn`` (no host syncs inside) in a CUDA graph; returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _rel_err(out, ref):
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


SWEEP_KERNELS = ("dense", "moe_triton", "moe_triton_pairs", "moe_torch", "grouped_mm")


def _sweep_fn(kind, x, W1, b1, W2, b2, sel, E):
    if kind == "moe_triton":
        return lambda: moe_ffn(x, W1, b1, W2, b2, sel, E, backend="triton", combine="hidden")
    if kind == "moe_triton_pairs":
        return lambda: moe_ffn(x, W1, b1, W2, b2, sel, E, backend="triton", combine="pairs")
    if kind == "moe_torch":
        return lambda: moe_ffn(x, W1, b1, W2, b2, sel, E, backend="torch")
    if kind == "grouped_mm":
        return lambda: grouped_mm_ffn(x, W1, b1, W2, b2, sel, E)
    raise ValueError(f"kernel {kind!r}: expected one of {SWEEP_KERNELS}")


def _time_dense(x, W1, b1, W2, b2, cfg, cuda, base) -> dict:
    """The dense FFN (two ``F.linear`` and a ReLU: cuBLAS on CUDA), checked against the reference with one
    expert holding every unit, then timed eagerly and (CUDA) from a graph."""
    T, D = x.shape
    d_ff = W1.shape[0]
    fn = lambda: _dense_ffn(x, W1, b1, W2, b2)  # noqa: E731
    ref_all = moe_ffn_reference(x, W1, b1, W2, b2, torch.ones(T, 1, dtype=torch.bool, device=x.device), 1)
    err = _rel_err(fn(), ref_all)
    if not err < cfg.check_tol:
        raise RuntimeError(f"dense FFN disagrees with the reference ({base['model']}, T={T}): {err:.3g}")
    ms = _bench(fn, cfg, cuda)
    g_ms = _bench(_graphed(fn), cfg, cuda) if (cuda and cfg.graphs) else None
    fl = T * (4 * D * d_ff + d_ff + D)
    return {**base, "kernel": "dense_cublas" if cuda else "dense", "d_e": None, "E": None, "fraction_target": 1.0,
            "fraction": 1.0, "pairs": None, "flops": fl, "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12,
            "speedup_vs_dense": 1.0, "graph_ms": g_ms, "graph_speedup_vs_dense": 1.0 if g_ms else None,
            "check_rel_err": err}


def run_sweep(cfg: SweepConfig, device: torch.device, log=print, checkpoint=None) -> list[dict]:
    """One row per (model, d_e, T, fraction, kernel): ``ms`` (do_bench median), ``tflops`` (useful FLOPs of
    :func:`moe_ffn_flops` over the time), ``speedup_vs_dense`` (dense ms / ms; dense rows are 1), and
    ``graph_ms`` / ``graph_speedup_vs_dense`` for CUDA-graph replays (dense and the sync-free moe_triton).
    Every output is checked against :func:`moe_ffn_reference` (dense against the all-experts reference)
    before it is timed; a point a kernel cannot run gets a row with ``skipped`` and the reason.
    ``checkpoint(rows)`` is called after every (model, T), so an interrupted sweep keeps what it timed."""
    bad = [k for k in cfg.kernels if k not in SWEEP_KERNELS]
    if bad:
        raise ValueError(f"kernels {bad}: expected names from {SWEEP_KERNELS}")
    cuda = device.type == "cuda"
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    gm = grouped_mm_info()
    rows: list[dict] = []
    with torch.no_grad():
        for name, D, d_ff in cfg.models:
            W1 = (torch.randn(d_ff, D, generator=gen) / math.sqrt(D)).to(device, dtype)
            b1 = (0.1 * torch.randn(d_ff, generator=gen)).to(device, dtype)
            W2 = (torch.randn(D, d_ff, generator=gen) / math.sqrt(d_ff)).to(device, dtype)
            b2 = (0.1 * torch.randn(D, generator=gen)).to(device, dtype)
            for T in cfg.tokens:
                x = torch.randn(T, D, generator=gen).to(device, dtype)
                base = dict(model=name, d_model=D, d_ff=d_ff, T=T, dtype=cfg.dtype)
                dense = _time_dense(x, W1, b1, W2, b2, cfg, cuda, base) if "dense" in cfg.kernels else None
                if dense:
                    rows.append(dense)
                for de in (d for d in cfg.expert_sizes if d_ff % d == 0):
                    E = d_ff // de
                    for f in cfg.fractions:  # Bernoulli(f) per (token, expert): a ragged count per token
                        sel = (torch.rand(T, E, generator=gen) < f) if f < 1.0 else torch.ones(T, E, dtype=torch.bool)
                        sel = sel.to(device)
                        fl = moe_ffn_flops(sel, D, d_ff, E)
                        ref = moe_ffn_reference(x, W1, b1, W2, b2, sel, E)
                        point = {**base, "d_e": de, "E": E, "fraction_target": f, "fraction": fl["pairs"] / max(1, T * E),
                                 "pairs": fl["pairs"], "flops": fl["moe_flops"]}
                        part_gib = fl["pairs"] * D * 4 / 2**30
                        first = len(rows)
                        for kind in (k for k in cfg.kernels if k != "dense"):
                            row = {**point, "kernel": kind}
                            if kind in ("moe_triton_pairs", "grouped_mm") and part_gib > cfg.max_partial_gib:
                                rows.append({**row, "skipped": f"per-pair outputs {part_gib:.1f} GiB > max_partial_gib"})
                                continue
                            if kind == "grouped_mm" and not gm["available"]:
                                rows.append({**row, "skipped": "torch._grouped_mm not in this PyTorch"})
                                continue
                            fn = _sweep_fn(kind, x, W1, b1, W2, b2, sel, E)
                            try:
                                out = fn()
                            except Exception as exc:  # grouped_mm's layout/dtype limits differ by version
                                if kind != "grouped_mm":
                                    raise
                                rows.append({**row, "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"})
                                continue
                            err = _rel_err(out, ref)
                            if not err < cfg.check_tol:
                                raise RuntimeError(f"{kind} disagrees with the reference ({name}, d_e={de}, T={T}, "
                                                   f"f={f}): rel err {err:.3g}")
                            ms = _bench(fn, cfg, cuda)
                            g_ms = _bench(_graphed(fn), cfg, cuda) if (cuda and cfg.graphs and kind == "moe_triton") else None
                            row.update(ms=ms, tflops=fl["moe_flops"] / (ms * 1e-3) / 1e12, check_rel_err=err,
                                       speedup_vs_dense=dense["ms"] / ms if dense else None, graph_ms=g_ms,
                                       graph_speedup_vs_dense=dense["graph_ms"] / g_ms if (g_ms and dense and dense["graph_ms"]) else None)
                            rows.append(row)
                        log(f"{name} d_e={de} T={T} f={f}: " + ", ".join(
                            f"{r['kernel']} {r['ms']:.4f} ms ({r['speedup_vs_dense'] or float('nan'):.2f}x)"
                            for r in rows[first:] if "ms" in r))
                del x
                if checkpoint is not None:
                    checkpoint(rows)
            if cuda:
                torch.cuda.empty_cache()
    return rows


def profile_parts(device: torch.device, points=None, tune: bool = False, cfg: SweepConfig = SweepConfig(),
                  log=print) -> list[dict]:
    """Per-launch times of the Triton path (dispatch, GEMM 1, each combine) next to cuBLAS's two GEMMs, at
    ``points`` = [(d_model, d_ff, T, d_e, fraction)], and (``tune``) a few tile variants of GEMM 1: the
    numbers behind the tile table and the cost model (docs/perf.md)."""
    if device.type != "cuda":
        raise RuntimeError("profile_parts needs a CUDA device")
    points = points or [(768, 3072, T, de, f) for T in (1, 1024, 32768) for de in (24, 96) for f in (0.1, 0.5)]
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = []
    n_sm = _n_sm(device.index if device.index is not None else torch.cuda.current_device())
    with torch.no_grad():
        for D, d_ff, T, de, f in points:
            E = d_ff // de
            x = torch.randn(T, D, generator=gen).to(device, dtype)
            W1 = (torch.randn(d_ff, D, generator=gen) / math.sqrt(D)).to(device, dtype)
            b1 = (0.1 * torch.randn(d_ff, generator=gen)).to(device, dtype)
            W2 = (torch.randn(D, d_ff, generator=gen) / math.sqrt(d_ff)).to(device, dtype)
            b2 = (0.1 * torch.randn(D, generator=gen)).to(device, dtype)
            sel = (torch.rand(T, E, generator=gen) < f).to(device)
            P = int(sel.sum())
            base = dict(d_model=D, d_ff=d_ff, T=T, d_e=de, E=E, fraction=f, pairs=P)
            c0 = _tiles(T, D, de, True, n_sm)
            prec, b = _dot_prec(dtype), lambda fn: _bench(fn, cfg, True)
            disp = _dispatch_triton(sel)
            hid = torch.zeros(T, d_ff, dtype=dtype, device=device)
            h = _launch_up(x, W1, b1, disp, E, c0, prec, False, cap=max(P, 1))
            part = _launch_down_pairs(h, W2, disp, E, T, c0, prec, False)
            t = {"dispatch": b(lambda: _dispatch_triton(sel)),
                 "zero_fill": b(lambda: torch.zeros(T, d_ff, dtype=dtype, device=device)),
                 "up_token_major": b(lambda: _launch_up(x, W1, b1, disp, E, c0, prec, False, hidden=hid)),
                 "up_pair_major": b(lambda: _launch_up(x, W1, b1, disp, E, c0, prec, False, cap=max(P, 1))),
                 "down_pairs": b(lambda: _launch_down_pairs(h, W2, disp, E, T, c0, prec, False)),
                 "combine": b(lambda: _launch_combine(part, b2, disp, T, E, True, dtype)),
                 "full_hidden": b(lambda: moe_ffn(x, W1, b1, W2, b2, sel, E, backend="triton", combine="hidden")),
                 "full_pairs": b(lambda: moe_ffn(x, W1, b1, W2, b2, sel, E, backend="triton", combine="pairs")),
                 "cublas_gemm1": b(lambda: F.linear(x, W1, b1)),
                 "cublas_gemm2": b(lambda: F.linear(hid, W2, b2)),
                 "dense": b(lambda: _dense_ffn(x, W1, b1, W2, b2))}
            rows.append({**base, "part_ms": t, "tiles": asdict(c0)})
            log(f"T={T} d_e={de} f={f}: " + ", ".join(f"{k} {v:.4f}" for k, v in t.items()))
            if tune:
                ref_h = h[:P].float()
                for bm1, bk1, w1, s1 in ((16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4), (64, 64, 8, 4), (128, 64, 8, 4)):
                    c = replace(c0, bm1=bm1, bk1=bk1, w1=w1, s1=s1)
                    try:
                        hv = _launch_up(x, W1, b1, disp, E, c, prec, False, cap=max(P, 1))
                        assert _rel_err(hv[:P], ref_h) < 1e-2
                        ms = b(lambda: _launch_up(x, W1, b1, disp, E, c, prec, False, cap=max(P, 1)))
                    except Exception as exc:
                        ms = f"{type(exc).__name__}: {str(exc)[:100]}"
                    rows.append({**base, "variant": "up", "bm1": bm1, "bk1": bk1, "w1": w1, "s1": s1, "ms": ms})
            del x, h, part, hid
            torch.cuda.empty_cache()
    return rows


def _env(device) -> dict:
    env = {"torch": torch.__version__, "triton": getattr(triton, "__version__", None) if HAS_TRITON else None,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda, "grouped_mm": grouped_mm_info()}
    try:
        import subprocess

        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:  # pragma: no cover
        env["git_commit"] = None
    return env


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kernels.moe_ffn",
                                 description="MoE FFN perf sweep: dense cuBLAS vs the Triton kernel vs torch._grouped_mm")
    ap.add_argument("--sweep", metavar="OUT.json", help="write the rows (and config, env) here")
    ap.add_argument("--parts", metavar="OUT.json", help="GPU: per-launch times and tile variants (profile_parts)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: small on a GPU, tiny (torch backend smoke test) without one")
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--expert-sizes", type=int, nargs="+")
    ap.add_argument("--fractions", type=float, nargs="+")
    ap.add_argument("--kernels", nargs="+")
    ap.add_argument("--models", nargs="+", help="name:d_model:d_ff, e.g. bert-base:768:3072")
    ap.add_argument("--no-graphs", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = PRESETS[args.preset or ("small" if device.type == "cuda" else "tiny")]
    over = {}
    if args.tokens:
        over["tokens"] = tuple(args.tokens)
    if args.expert_sizes:
        over["expert_sizes"] = tuple(args.expert_sizes)
    if args.fractions:
        over["fractions"] = tuple(args.fractions)
    if args.kernels:
        over["kernels"] = tuple(args.kernels)
    if args.models:
        over["models"] = tuple((m.split(":")[0], int(m.split(":")[1]), int(m.split(":")[2])) for m in args.models)
    if args.no_graphs:
        over["graphs"] = False
    cfg = replace(cfg, **over)
    if not (args.sweep or args.parts):
        ap.error("give --sweep OUT.json (or --parts OUT.json)")
    t0 = time.perf_counter()
    env = _env(device)
    kind, out = ("moe_ffn_parts", args.parts) if args.parts else ("moe_ffn_sweep", args.sweep)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def write(rows, complete):
        doc = {"kind": kind, "complete": complete, "config": asdict(cfg), "env": env,
               "wall_s": time.perf_counter() - t0, "rows": rows}
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, out)  # atomic: a reader never sees half a file

    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.parts:
        rows = profile_parts(device, tune=True, log=log)
    else:
        rows = run_sweep(cfg, device, log=log, checkpoint=lambda r: write(r, False))
    write(rows, True)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

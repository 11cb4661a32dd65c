"""Block layouts for block-sparse attention: validation, lookup tables, generators.

A *layout* is a bool tensor of shape ``(H, nbq, nbk)`` or ``(1, nbq, nbk)`` (broadcast over
heads).  ``layout[h, i, j]`` is True when query block ``i`` may attend key block ``j``;
``nbq = ceil(Lq / block_size)``, ``nbk = ceil(Lk / block_size)`` (square ``nb x nb`` for
self-attention, rectangular for cross-attention).  A layout made on the model's maximum grid is
cut to the actual lengths with :func:`slice_layout`.

Causal geometry (the convention of the dense cores in methods/dense.py): the queries are the
*last* ``Lq`` positions, so query ``i`` sees keys ``j <= i + (Lk - Lq)`` (bottom-right aligned
diagonal; for ``Lq == Lk`` the usual lower triangle).  :func:`causal_block_mask` is the block-level
version: block ``(I, J)`` holds at least one visible entry.

Lookup tables (LUTs)
--------------------
The Triton kernels never look at the dense layout; they walk two compressed tables built once per
distinct layout content (and causal geometry, because causal attention drops the blocks above the
diagonal before the tables are built):

* **row CSR** (forward pass and dQ): for layout head ``g`` and query block ``i`` the kept key
  blocks are ``col_idx[row_ptr[g*nbq + i] : row_ptr[g*nbq + i + 1]]``, ascending.
* **column CSC** (dK and dV): for layout head ``g`` and key block ``j`` the kept query blocks
  are ``row_idx[col_ptr[g*nbk + j] : col_ptr[g*nbk + j + 1]]``, ascending.

Both are int32 and hold ``Hl * nb + 1`` offsets plus ``nnz + 1`` indices (one trailing pad
entry so that a kernel may always read ``idx[max(hi - 1, 0)]``): O(nnz blocks) memory.

Caching (content-keyed)
-----------------------
``get_lut(layout, causal, device, lq=, lk=, block_size=)`` returns the tables of the layout's
**current content**.  Every call reads the layout's bytes (``Hl * nbq * nbk`` bytes: 1 KB for an
LRA layout, 256 KB for H=16 at L=16k with 128-blocks) and compares them with a snapshot kept for
the same memory (a ``memcmp``, ~3 us for 1 KB and ~20 us for 256 KB on the 2-core CI box).  So an edit
made behind autograd's back (``layout.data[...] = ...``, a numpy array or DLPack view sharing the
memory), which does not bump ``layout._version``, and layouts made under ``torch.inference_mode()``
(no version counter at all) are all seen.  On a mismatch the content's blake2b digest finds (or
builds, once per distinct content) the tables, so equal layouts in different tensors share one
entry.  The LUT build (``nonzero`` over the layout, host side, then one host-to-device copy) never
runs on a hit.

Cost on a GPU: reading a *CUDA* layout's bytes is a device-to-host copy, i.e. one stream sync per
call.  Keep layouts on the CPU (the kernels accept a CPU layout with CUDA q, k, v; the tables live
on the inputs' device) and a call never syncs.  While a CUDA graph is being captured the bytes of a
CUDA layout cannot be read; then the snapshot of the same memory taken by an earlier eager call is
trusted (the captured graph freezes the LUT anyway), and a layout never seen before is an error.
Both caches are small LRUs (``_LUT_CACHE_SIZE`` entries; the snapshots at most 64 MiB together).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .errors import KernelArgumentError, describe

__all__ = [
    "LayoutLUT",
    "validate_layout",
    "build_lut",
    "get_lut",
    "clear_lut_cache",
    "causal_block_mask",
    "slice_layout",
    "random_layout",
    "local_layout",
    "longformer_layout",
    "bigbird_layout",
    "strided_layout",
    "layout_density",
    "dense_mask_from_layout",
]


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def validate_layout(layout, n_heads: int, nbq: int, nbk: int | None = None) -> torch.Tensor:
    """Check ``layout`` is a bool tensor of shape (n_heads or 1, nbq, nbk); return it.

    ``nbk`` defaults to ``nbq`` (square).  Raises :class:`KernelArgumentError` (a ValueError)
    naming ``layout`` and what was expected.
    """
    nbk = nbq if nbk is None else nbk
    if not isinstance(layout, torch.Tensor):
        raise KernelArgumentError(f"layout: expected a torch.Tensor of dtype torch.bool, got {describe(layout)}")
    if layout.dtype != torch.bool:
        raise KernelArgumentError(f"layout: expected dtype torch.bool, got {layout.dtype}")
    if layout.dim() != 3 or layout.shape[0] not in (1, n_heads) or layout.shape[1] != nbq or layout.shape[2] != nbk:
        raise KernelArgumentError(
            f"layout: expected shape ({n_heads}, {nbq}, {nbk}) or (1, {nbq}, {nbk}) "
            f"(ceil(Lq / block_size), ceil(Lk / block_size)), got {tuple(layout.shape)}"
        )
    return layout


# --------------------------------------------------------------------------------------
# Causal geometry
# --------------------------------------------------------------------------------------
def causal_block_mask(nbq: int, nbk: int, lq: int, lk: int, block_size: int, device=None) -> torch.Tensor:
    """(nbq, nbk) bool: block (I, J) holds at least one entry with ``j <= i + (lk - lq)``.

    The last query row of block I is ``min((I+1)*bs, lq) - 1``, so the block is visible iff
    ``J*bs <= min((I+1)*bs, lq) - 1 + lk - lq``.  For lq == lk this is the lower block triangle.
    """
    bs = block_size
    last_row = torch.clamp((torch.arange(nbq, device=device) + 1) * bs, max=lq) - 1  # (nbq,)
    first_col = torch.arange(nbk, device=device) * bs  # (nbk,)
    return first_col[None, :] <= (last_row + (lk - lq))[:, None]


def _effective_layout(layout: torch.Tensor, causal: bool, geometry=None) -> torch.Tensor:
    """The blocks the kernels compute: ``layout`` minus the blocks fully above the causal diagonal.

    ``geometry``: ``(lq, lk, block_size)``; None means square (the lower block triangle)."""
    if not causal:
        return layout
    nbq, nbk = layout.shape[-2:]
    if geometry is None:
        if nbq != nbk:
            raise KernelArgumentError(
                f"layout: a causal rectangular layout {tuple(layout.shape)} needs lq, lk and block_size")
        vis = torch.ones(nbq, nbk, dtype=torch.bool, device=layout.device).tril()
    else:
        lq, lk, bs = geometry
        vis = causal_block_mask(nbq, nbk, lq, lk, bs, device=layout.device)
    return layout & vis


def _geometry(causal, nbq, nbk, lq, lk, block_size):
    """The part of (lq, lk, block_size) that changes a causal LUT; None when the LUT does not depend on it
    (non-causal, or square lq == lk: then causal is the lower block triangle whatever the lengths)."""
    if not causal:
        return None
    if lq is None and lk is None:
        return None
    if lq is None or lk is None or block_size is None:
        raise KernelArgumentError("get_lut: pass lq, lk and block_size together (or none of them)")
    if lq == lk and nbq == nbk:
        return None
    return (int(lq), int(lk), int(block_size))


def slice_layout(layout: torch.Tensor, lq: int, lk: int, block_size: int) -> torch.Tensor:
    """Cut a layout made on a maximum grid to ``(Hl, ceil(lq / bs), ceil(lk / bs))`` (a view)."""
    nbq, nbk = math.ceil(lq / block_size), math.ceil(lk / block_size)
    if layout.dim() != 3 or layout.shape[1] < nbq or layout.shape[2] < nbk:
        raise KernelArgumentError(
            f"layout: expected at least ({nbq}, {nbk}) blocks to slice for lq={lq}, lk={lk}, block_size={block_size}, "
            f"got shape {tuple(layout.shape)}")
    return layout[:, :nbq, :nbk]


# --------------------------------------------------------------------------------------
# Lookup tables
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutLUT:
    n_layout_heads: int  # Hl: 1 (broadcast) or H
    nbq: int  # query blocks (CSR rows)
    nbk: int  # key blocks (CSC columns)
    causal: bool
    row_ptr: torch.Tensor  # int32 (Hl*nbq + 1,)  CSR offsets, per (head, query block)
    col_idx: torch.Tensor  # int32 (nnz + 1,)     kept key blocks (+1 pad entry)
    col_ptr: torch.Tensor  # int32 (Hl*nbk + 1,)  CSC offsets, per (head, key block)
    row_idx: torch.Tensor  # int32 (nnz + 1,)     kept query blocks (+1 pad entry)
    nnz: int  # kept (head, query block, key block) triples after the causal trim
    max_row_nnz: int
    max_col_nnz: int
    geometry: tuple | None = None  # (lq, lk, block_size) of a causal rectangular LUT, else None

    @property
    def nb(self) -> int:
        """Square layouts: the number of blocks per side (== nbq)."""
        return self.nbq


def build_lut(layout: torch.Tensor, causal: bool = False, device=None, *, lq=None, lk=None,
              block_size=None) -> LayoutLUT:
    """Build CSR (rows) and CSC (columns) tables of a (Hl, nbq, nbk) bool layout (uncached).

    ``lq, lk, block_size`` give the causal geometry of a rectangular layout (see the module doc)."""
    if not isinstance(layout, torch.Tensor) or layout.dim() != 3 or layout.dtype != torch.bool:
        raise KernelArgumentError(f"layout: expected a bool (Hl, nbq, nbk) tensor, got {describe(layout)}")
    device = layout.device if device is None else torch.device(device)
    hl, nbq, nbk = layout.shape
    geometry = _geometry(causal, nbq, nbk, lq, lk, block_size)
    lay = _effective_layout(layout.detach().to("cpu"), causal, geometry)
    row_cnt = lay.sum(-1).reshape(-1)  # (Hl*nbq,)
    col_cnt = lay.sum(-2).reshape(-1)  # (Hl*nbk,)
    row_ptr = torch.zeros(hl * nbq + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(row_cnt, 0)
    col_ptr = torch.zeros(hl * nbk + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(col_cnt, 0)
    nz = torch.nonzero(lay)  # lexicographic (h, i, j): CSR order
    pad = torch.zeros(1, dtype=torch.int64)  # one trailing pad entry: kernels may read idx[max(hi-1, 0)]
    col_idx = torch.cat([nz[:, 2], pad])
    nzt = torch.nonzero(lay.transpose(1, 2))  # (h, j, i): CSC order
    row_idx = torch.cat([nzt[:, 2], pad])
    as32 = lambda t: t.to(dtype=torch.int32, device=device).contiguous()  # noqa: E731
    return LayoutLUT(
        n_layout_heads=hl,
        nbq=nbq,
        nbk=nbk,
        causal=bool(causal),
        row_ptr=as32(row_ptr),
        col_idx=as32(col_idx),
        col_ptr=as32(col_ptr),
        row_idx=as32(row_idx),
        nnz=int(nz.shape[0]),
        max_row_nnz=int(row_cnt.max().item()) if row_cnt.numel() else 0,
        max_col_nnz=int(col_cnt.max().item()) if col_cnt.numel() else 0,
        geometry=geometry,
    )


_LUT_CACHE_SIZE = 256
_LUT_CACHE: "OrderedDict[tuple, LayoutLUT]" = OrderedDict()  # (digest, shape, causal, geometry, device) -> LUT
_SEEN: "OrderedDict[tuple, tuple]" = OrderedDict()  # (data_ptr, shape, strides, device) -> (snapshot bytes, digest)
_SEEN_BYTES = [0]  # total snapshot bytes held by _SEEN
_SEEN_MAX_BYTES = 64 << 20
_CACHE_STATS = {"hits": 0, "misses": 0}


def clear_lut_cache() -> None:
    _LUT_CACHE.clear()
    _SEEN.clear()
    _SEEN_BYTES[0] = 0
    _CACHE_STATS.update(hits=0, misses=0)


def _content(layout: torch.Tensor):
    """(digest, snapshot bytes) of the layout's current content.

    The snapshot of the last layout seen at the same memory (data pointer, shape, strides, device) is compared
    byte for byte first, so an unchanged layout (the same tensor, or a fresh view of it such as a
    ``slice_layout`` per call) is not re-hashed; the comparison, not the key, decides, so a recycled address
    can never give stale tables."""
    dev = layout.device
    key = (layout.data_ptr(), layout.shape, layout.stride(), dev)
    seen = _SEEN.get(key)
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        if seen is None:
            raise KernelArgumentError(
                "layout: a CUDA layout seen for the first time during CUDA-graph capture; run one eager call first "
                "or pass the layout on the CPU")
        return seen[1], seen[0]
    if dev.type == "cpu" and layout.is_contiguous():
        raw = layout.numpy().tobytes()  # no copy but the snapshot itself (~1 us for 1 KB)
    else:
        raw = layout.detach().to("cpu").contiguous().numpy().tobytes()  # a CUDA layout: one D2H copy (a sync)
    if seen is not None and seen[0] == raw:
        _SEEN.move_to_end(key)
        return seen[1], raw
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    old = _SEEN.pop(key, None)
    if old is not None:
        _SEEN_BYTES[0] -= len(old[0])
    _SEEN[key] = (raw, digest)
    _SEEN_BYTES[0] += len(raw)
    while len(_SEEN) > 1 and (len(_SEEN) > _LUT_CACHE_SIZE or _SEEN_BYTES[0] > _SEEN_MAX_BYTES):
        _SEEN_BYTES[0] -= len(_SEEN.popitem(last=False)[1][0])
    return digest, raw


def get_lut(layout: torch.Tensor, causal: bool = False, device=None, *, lq=None, lk=None,
            block_size=None) -> LayoutLUT:
    """Cached :func:`build_lut`, keyed on the layout's content (see the module doc)."""
    if not isinstance(layout, torch.Tensor) or layout.dim() != 3 or layout.dtype != torch.bool:
        raise KernelArgumentError(f"layout: expected a bool (Hl, nbq, nbk) tensor, got {describe(layout)}")
    device = layout.device if device is None else torch.device(device)
    shape = tuple(layout.shape)
    geometry = _geometry(causal, shape[1], shape[2], lq, lk, block_size)
    digest, raw = _content(layout)
    key = (digest, shape, bool(causal), geometry, device)
    lut = _LUT_CACHE.get(key)
    if lut is not None:
        _LUT_CACHE.move_to_end(key)
        _CACHE_STATS["hits"] += 1
        return lut
    _CACHE_STATS["misses"] += 1
    # built from the snapshot that was hashed, never from the live tensor (which may change meanwhile)
    snap = torch.frombuffer(bytearray(raw), dtype=torch.bool).view(shape) if raw else torch.zeros(shape, dtype=torch.bool)
    lut = build_lut(snap, causal, device, lq=lq, lk=lk, block_size=block_size)
    _LUT_CACHE[key] = lut
    while len(_LUT_CACHE) > _LUT_CACHE_SIZE:
        _LUT_CACHE.popitem(last=False)
    return lut


# --------------------------------------------------------------------------------------
# Element-level mask (for references and tests; O(L^2), small sizes only)
# --------------------------------------------------------------------------------------
def dense_mask_from_layout(layout: torch.Tensor, L: int, block_size: int, causal: bool = False,
                           lk: int | None = None) -> torch.Tensor:
    """(Hl, L, lk) bool element mask: layout upsampled by block_size, cropped to L query rows and lk keys
    (``lk`` defaults to L), causal applied with the bottom-right convention (key j <= i + lk - L)."""
    lk = L if lk is None else lk
    m = layout.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :L, :lk]
    if causal:
        m = m & torch.ones(L, lk, dtype=torch.bool, device=layout.device).tril(diagonal=lk - L)
    return m


# --------------------------------------------------------------------------------------
# Generators: all return bool (1, nb, nb) (random_layout: (n_heads_or_1, nb, nb))
# --------------------------------------------------------------------------------------
def _diag(nb: int) -> torch.Tensor:
    return torch.eye(nb, dtype=torch.bool)


def random_layout(n_heads_or_1: int, nb: int, density: float, generator=None, keep_diagonal: bool = True) -> torch.Tensor:
    """Per-head random layout with ``round(density * nb^2)`` kept blocks per head (exact count).

    With ``keep_diagonal`` the nb diagonal blocks are kept first and the rest of the budget is
    drawn uniformly from the off-diagonal blocks (so density is max(density, 1/nb)).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density: expected a value in [0, 1], got {density}")
    total = nb * nb
    target = int(round(density * total))
    out = torch.zeros(n_heads_or_1, nb * nb, dtype=torch.bool)
    diag_flat = torch.arange(nb) * (nb + 1)
    offdiag = torch.ones(total, dtype=torch.bool)
    if keep_diagonal:
        offdiag[diag_flat] = False
    cand = torch.nonzero(offdiag).squeeze(1)
    for h in range(n_heads_or_1):
        n_extra = target - nb if keep_diagonal else target
        n_extra = max(0, min(n_extra, cand.numel()))
        perm = torch.randperm(cand.numel(), generator=generator)[:n_extra]
        out[h, cand[perm]] = True
        if keep_diagonal:
            out[h, diag_flat] = True
    return out.view(n_heads_or_1, nb, nb)


def local_layout(nb: int, window_blocks: int) -> torch.Tensor:
    """Sliding window: |i - j| <= window_blocks (window_blocks = 0 is the diagonal)."""
    i = torch.arange(nb)
    return ((i[:, None] - i[None, :]).abs() <= window_blocks).unsqueeze(0)


def longformer_layout(nb: int, window_blocks: int, global_blocks: int) -> torch.Tensor:
    """Sliding window plus the first ``global_blocks`` blocks as global rows and columns."""
    lay = local_layout(nb, window_blocks).clone()
    g = min(global_blocks, nb)
    lay[:, :g, :] = True
    lay[:, :, :g] = True
    return lay


def bigbird_layout(nb: int, window_blocks: int, global_blocks: int, random_blocks: int, generator=None) -> torch.Tensor:
    """Longformer layout plus ``random_blocks`` random extra key blocks per query row."""
    lay = longformer_layout(nb, window_blocks, global_blocks).clone()
    for i in range(nb):
        free = torch.nonzero(~lay[0, i]).squeeze(1)
        if free.numel() == 0 or random_blocks <= 0:
            continue
        pick = free[torch.randperm(free.numel(), generator=generator)[: min(random_blocks, free.numel())]]
        lay[0, i, pick] = True
    return lay


def strided_layout(nb: int, local_blocks: int, stride_blocks: int) -> torch.Tensor:
    """Sparse-Transformer 'strided' pattern (Child et al.), block level, non-causal form:
    keep (i, j) when |i - j| < local_blocks or (j % stride_blocks) == stride_blocks - 1."""
    i = torch.arange(nb)
    local = (i[:, None] - i[None, :]).abs() < max(local_blocks, 1)
    strided = ((i[None, :] % stride_blocks) == (stride_blocks - 1)).expand(nb, nb)
    return (local | strided).unsqueeze(0)


def layout_density(layout: torch.Tensor, causal: bool = False) -> float:
    """Fraction of kept blocks; with causal, over the nb(nb+1)/2 blocks on or below the diagonal."""
    nb = layout.shape[-1]
    lay = layout.reshape(-1, nb, nb)
    if causal:
        lay = _effective_layout(lay, True)
        denom = lay.shape[0] * nb * (nb + 1) / 2
    else:
        denom = lay.shape[0] * nb * nb
    return float(lay.sum().item()) / denom if denom else 0.0


def n_blocks(L: int, block_size: int) -> int:
    return math.ceil(L / block_size)

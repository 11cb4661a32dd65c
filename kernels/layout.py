"""Block layouts for block-sparse attention: validation, lookup tables, generators.

A *layout* is a bool tensor of shape ``(H, nb, nb)`` or ``(1, nb, nb)`` (broadcast over
heads).  ``layout[h, i, j]`` is True when query block ``i`` may attend key block ``j``.
``nb = ceil(L / block_size)``.

Lookup tables (LUTs)
--------------------
The Triton kernels never look at the dense ``nb x nb`` layout; they walk two compressed
tables built once per layout (and per ``causal`` flag, because causal attention drops the
blocks above the diagonal before the tables are built):

* **row CSR** (forward pass and dQ): for layout head ``g`` and query block ``i`` the kept key
  blocks are ``col_idx[row_ptr[g*nb + i] : row_ptr[g*nb + i + 1]]``, ascending.
* **column CSC** (dK and dV): for layout head ``g`` and key block ``j`` the kept query blocks
  are ``row_idx[col_ptr[g*nb + j] : col_ptr[g*nb + j + 1]]``, ascending.

Both are int32 and hold ``Hl * nb + 1`` offsets plus ``nnz + 1`` indices (one trailing pad
entry so that a kernel may always read ``idx[max(hi - 1, 0)]``): O(nnz blocks) memory.

Caching
-------
``get_lut(layout, causal, device)`` caches tables keyed by the layout tensor's **identity and
version counter** (``id(layout)``, ``layout._version``), plus ``causal`` and the target device.
A weak reference to the tensor is stored with the entry, so a recycled ``id`` of a dead tensor
never hits, and an in-place edit of the layout (which bumps ``_version``) invalidates the entry.
Nothing is hashed, so a cache hit costs no device synchronisation.  Two *different* tensors
with equal content get separate entries (build one layout tensor per layer and reuse it).
The cache is a small LRU (``_LUT_CACHE_SIZE`` entries).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = [
    "LayoutLUT",
    "validate_layout",
    "build_lut",
    "get_lut",
    "clear_lut_cache",
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
def validate_layout(layout, n_heads: int, nb: int) -> torch.Tensor:
    """Check ``layout`` is a bool tensor of shape (n_heads or 1, nb, nb); return it.

    Raises ValueError naming ``layout`` and what was expected.
    """
    if not isinstance(layout, torch.Tensor):
        raise ValueError(f"layout: expected a torch.Tensor of dtype torch.bool, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise ValueError(f"layout: expected dtype torch.bool, got {layout.dtype}")
    if layout.dim() != 3 or layout.shape[0] not in (1, n_heads) or layout.shape[1] != nb or layout.shape[2] != nb:
        raise ValueError(
            f"layout: expected shape ({n_heads}, {nb}, {nb}) or (1, {nb}, {nb}) "
            f"(nb = ceil(L / block_size)), got {tuple(layout.shape)}"
        )
    return layout


# --------------------------------------------------------------------------------------
# Lookup tables
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutLUT:
    n_layout_heads: int  # Hl: 1 (broadcast) or H
    nb: int
    causal: bool
    row_ptr: torch.Tensor  # int32 (Hl*nb + 1,)  CSR offsets, per (head, query block)
    col_idx: torch.Tensor  # int32 (nnz + 1,)    kept key blocks (+1 pad entry)
    col_ptr: torch.Tensor  # int32 (Hl*nb + 1,)  CSC offsets, per (head, key block)
    row_idx: torch.Tensor  # int32 (nnz + 1,)    kept query blocks (+1 pad entry)
    nnz: int
    max_row_nnz: int
    max_col_nnz: int


def _effective_layout(layout: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:
        nb = layout.shape[-1]
        tril = torch.ones(nb, nb, dtype=torch.bool, device=layout.device).tril()
        layout = layout & tril
    return layout


def build_lut(layout: torch.Tensor, causal: bool = False, device=None) -> LayoutLUT:
    """Build CSR (rows) and CSC (columns) tables of a (Hl, nb, nb) bool layout (uncached)."""
    if layout.dim() != 3 or layout.dtype != torch.bool or layout.shape[1] != layout.shape[2]:
        raise ValueError(f"layout: expected bool (Hl, nb, nb), got {layout.dtype} {tuple(layout.shape)}")
    device = layout.device if device is None else torch.device(device)
    lay = _effective_layout(layout.detach().to("cpu"), causal)
    hl, nb, _ = lay.shape
    row_cnt = lay.sum(-1).reshape(-1)  # (Hl*nb,)
    col_cnt = lay.sum(-2).reshape(-1)
    row_ptr = torch.zeros(hl * nb + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(row_cnt, 0)
    col_ptr = torch.zeros(hl * nb + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(col_cnt, 0)
    nz = torch.nonzero(lay)  # lexicographic (h, i, j): CSR order
    pad = torch.zeros(1, dtype=torch.int64)  # one trailing pad entry: kernels may read idx[max(hi-1, 0)]
    col_idx = torch.cat([nz[:, 2], pad])
    nzt = torch.nonzero(lay.transpose(1, 2))  # (h, j, i): CSC order
    row_idx = torch.cat([nzt[:, 2], pad])
    as32 = lambda t: t.to(dtype=torch.int32, device=device).contiguous()  # noqa: E731
    return LayoutLUT(
        n_layout_heads=hl,
        nb=nb,
        causal=bool(causal),
        row_ptr=as32(row_ptr),
        col_idx=as32(col_idx),
        col_ptr=as32(col_ptr),
        row_idx=as32(row_idx),
        nnz=int(nz.shape[0]),
        max_row_nnz=int(row_cnt.max().item()) if row_cnt.numel() else 0,
        max_col_nnz=int(col_cnt.max().item()) if col_cnt.numel() else 0,
    )


_LUT_CACHE_SIZE = 256
_LUT_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_STATS = {"hits": 0, "misses": 0}


def clear_lut_cache() -> None:
    _LUT_CACHE.clear()
    _CACHE_STATS.update(hits=0, misses=0)


def get_lut(layout: torch.Tensor, causal: bool = False, device=None) -> LayoutLUT:
    """Cached :func:`build_lut`; key = (id, _version, causal, device), see module doc."""
    device = layout.device if device is None else torch.device(device)
    key = (id(layout), layout._version, bool(causal), str(device))
    hit = _LUT_CACHE.get(key)
    if hit is not None:
        ref, lut = hit
        if ref() is layout:
            _LUT_CACHE.move_to_end(key)
            _CACHE_STATS["hits"] += 1
            return lut
        del _LUT_CACHE[key]
    _CACHE_STATS["misses"] += 1
    lut = build_lut(layout, causal, device)
    _LUT_CACHE[key] = (weakref.ref(layout), lut)
    while len(_LUT_CACHE) > _LUT_CACHE_SIZE:
        _LUT_CACHE.popitem(last=False)
    return lut


# --------------------------------------------------------------------------------------
# Element-level mask (for references and tests; O(L^2), small sizes only)
# --------------------------------------------------------------------------------------
def dense_mask_from_layout(layout: torch.Tensor, L: int, block_size: int, causal: bool = False) -> torch.Tensor:
    """(Hl, L, L) bool element mask: layout upsampled by block_size, cropped to L, causal applied."""
    m = layout.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :L, :L]
    if causal:
        m = m & torch.ones(L, L, dtype=torch.bool, device=layout.device).tril()
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

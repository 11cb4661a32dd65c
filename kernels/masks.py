"""Element-level attention masks for block-sparse attention (Attention Pruning), and cost accounting.

An *element mask* is a bool ``(H or 1, Lq, Lk)`` tensor, True = keep the score entry (AP's pruning
mask is the negation).  The block-sparse kernel skips compute per *block* (its layout) and applies the
element mask inside the kept blocks, so an element-level mask is exact while only the blocks that hold
a kept entry cost FLOPs (spec attention_pruning.md §3.3-3.4).

What is here:

* :class:`PackedMask` / :func:`pack_element_mask`: the kernels' storage of an element mask, bit-packed
  along keys (8 keys per byte, bit ``b`` of byte ``w`` is key ``8w + b``), rows padded to a multiple of
  128 and keys to a multiple of 128 (so every kernel tile of a kept block reads in bounds, no load mask).
  Memory ``Hm * ceil128(Lq) * ceil128(Lk) / 8`` bytes: 2 MB per (head) at 4096 x 4096 (a uint8 mask
  would be 8x that, a bool tensor too).  A PackedMask owns its bits (a private copy), so editing the
  bool mask afterwards cannot make it stale; build it once per layer and pass it to every call.
* :func:`layout_from_element_mask`: element mask -> block layout, "any element kept" rule
  (``maxpool(keep, B) > 0``, the LLaMA follow-up's rule) or "at least a fraction kept".
* :func:`mask_sparsity`: measured element-level vs block-level sparsity (pitfalls 4 and 10: coarser
  blocks keep a block when one of its B^2 entries survives, so the realised block sparsity is lower).
* :func:`fully_pruned_rows`: the rows with no kept entry (where ``empty_rows`` of the kernel applies).
* :func:`block_sparse_flops`: the FLOPs the kernel executes for a layout.

Causal convention everywhere (as the kernel and methods/dense.py): query ``i`` sees keys
``j <= i + (Lk - Lq)``; only those *valid* entries count as the denominator of a density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import KernelArgumentError, describe
from .layout import _effective_layout, causal_block_mask, dense_mask_from_layout

__all__ = [
    "PackedMask",
    "pack_element_mask",
    "causal_element_mask",
    "layout_from_element_mask",
    "mask_sparsity",
    "fully_pruned_rows",
    "block_sparse_flops",
]

PACK_PAD = 128  # rows and keys padded to a multiple of the largest supported block size


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


# --------------------------------------------------------------------------------------
# Packed storage
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PackedMask:
    """Bit-packed element mask: ``bits`` uint8 ``(Hm, ceil128(lq), ceil128(lk) / 8)``; zero bits past
    ``(lq, lk)``.  Bit ``b`` of ``bits[h, i, w]`` is ``keep[h, i, 8w + b]``."""

    bits: torch.Tensor
    n_heads: int  # Hm: 1 (broadcast over heads) or H
    lq: int
    lk: int

    @property
    def shape(self) -> tuple:
        return (self.n_heads, self.lq, self.lk)

    @property
    def device(self) -> torch.device:
        return self.bits.device

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def unpack(self) -> torch.Tensor:
        """The bool ``(Hm, lq, lk)`` mask (O(Hm lq lk) memory: references and tests)."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        x = (self.bits[..., None] >> shifts) & 1  # (Hm, R, C/8, 8)
        return x.reshape(self.bits.shape[0], self.bits.shape[1], -1)[:, : self.lq, : self.lk].bool()

    def to(self, device) -> "PackedMask":
        return PackedMask(self.bits.to(device), self.n_heads, self.lq, self.lk)


def _check_mask(mask, name="element_mask") -> torch.Tensor:
    if isinstance(mask, PackedMask):
        return mask.unpack()
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise KernelArgumentError(
            f"{name}: expected a bool tensor of shape (H or 1, Lq, Lk) (True = keep) or a PackedMask, "
            f"got {describe(mask)}")
    if min(mask.shape) < 1:
        raise KernelArgumentError(f"{name}: expected a non-empty (H or 1, Lq, Lk) mask, got shape {tuple(mask.shape)}")
    return mask


def pack_element_mask(mask: torch.Tensor, device=None) -> PackedMask:
    """Pack a bool ``(H or 1, Lq, Lk)`` keep-mask for the kernels (see the module doc).

    Cost: one pass over the mask (O(Hm Lq Lk) bytes); do it once per layer, not per call."""
    if isinstance(mask, PackedMask):
        return mask if device is None else mask.to(device)
    mask = _check_mask(mask)
    dev = mask.device if device is None else torch.device(device)
    hm, lq, lk = mask.shape
    r, c = _ceil_to(lq, PACK_PAD), _ceil_to(lk, PACK_PAD)
    pad = torch.zeros(hm, r, c, dtype=torch.uint8, device=dev)
    pad[:, :lq, :lk] = mask.to(dev)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=dev)
    bits = (pad.view(hm, r, c // 8, 8) * weights).sum(-1, dtype=torch.uint8).contiguous()
    return PackedMask(bits, hm, lq, lk)


# --------------------------------------------------------------------------------------
# Conversion and accounting
# --------------------------------------------------------------------------------------
def causal_element_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """(lq, lk) bool: key j visible from query i iff ``j <= i + lk - lq`` (bottom-right diagonal)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _check_bs(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise KernelArgumentError(f"block_size: expected a positive int, got {describe(block_size)}")


def _block_counts(m: torch.Tensor, block_size: int) -> torch.Tensor:
    """(X, lq, lk) bool -> (X, nbq, nbk) int64 counts of True per block (partial blocks zero-padded)."""
    x, lq, lk = m.shape
    bs = block_size
    nbq, nbk = math.ceil(lq / bs), math.ceil(lk / bs)
    pad = torch.zeros(x, nbq * bs, nbk * bs, dtype=torch.int32, device=m.device)
    pad[:, :lq, :lk] = m
    return pad.view(x, nbq, bs, nbk, bs).sum((2, 4), dtype=torch.int64)


def layout_from_element_mask(mask, block_size: int, *, causal: bool = False, min_fraction: float = 0.0) -> torch.Tensor:
    """Block layout ``(Hm, ceil(Lq/bs), ceil(Lk/bs))`` of an element keep-mask.

    ``min_fraction == 0`` (default): the "any element kept" rule, so kept elements are a subset of the
    kept blocks (the kernel with this layout and the element mask is exact).  ``min_fraction > 0``: keep a
    block only when at least that fraction of its valid entries is kept (spec §3.4's "≥ k % kept" suite
    option); the kept elements of a dropped block are then pruned too (the attention computed is
    ``mask & upsampled(layout)``).  With ``causal`` entries above the diagonal are ignored (structural
    zeros need no block).
    """
    m = _check_mask(mask, "mask")
    _check_bs(block_size)
    if not isinstance(causal, bool):
        raise KernelArgumentError(f"causal: expected True or False, got {describe(causal)}")
    hm, lq, lk = m.shape
    if causal:
        m = m & causal_element_mask(lq, lk, m.device)
    cnt = _block_counts(m, block_size)
    if min_fraction <= 0:
        return cnt > 0
    if min_fraction > 1:
        raise KernelArgumentError(f"min_fraction: expected a value in [0, 1], got {min_fraction!r}")
    valid = causal_element_mask(lq, lk, m.device) if causal else torch.ones(lq, lk, dtype=torch.bool, device=m.device)
    n_valid = _block_counts(valid[None], block_size)
    return (cnt > 0) & (cnt >= min_fraction * n_valid)


def mask_sparsity(mask, block_size: int, *, causal: bool = False, layout: torch.Tensor | None = None) -> dict:
    """Measured sparsity of an element keep-mask and of its block layout (spec pitfalls 4 and 10).

    ``layout`` defaults to :func:`layout_from_element_mask` (any rule).  Densities are fractions of the
    *valid* entries (the causal lower triangle when ``causal``; every entry otherwise) unless named
    ``grid``.  Returns floats over all heads, plus ``per_head`` lists:

    * ``element_density`` / ``element_sparsity``: kept valid entries / valid entries (and 1 - that);
      pitfall 4's (c) without padding.
    * ``grid_pruned_fraction``: 1 - kept valid entries / (Lq * Lk): the pruned fraction on the full
      grid, structural zeros included (what AP's nominal tau counts); pitfall 4's (b).
    * ``block_density`` / ``block_sparsity``: kept blocks / blocks holding a valid entry (the blocks the
      kernel computes, causal blocks counted whole).
    * ``covered_density``: valid entries inside kept blocks / valid entries: the element-level density
      the compute corresponds to; ``covered_density - element_density`` is the sparsity lost to blocks.
    * ``fully_pruned_rows`` (over heads x Lq; no kept valid entry, padding ignored) and ``rows``.
    """
    m = _check_mask(mask, "mask")
    _check_bs(block_size)
    hm, lq, lk = m.shape
    bs = block_size
    nbq, nbk = math.ceil(lq / bs), math.ceil(lk / bs)
    dev = m.device
    valid = causal_element_mask(lq, lk, dev) if causal else torch.ones(lq, lk, dtype=torch.bool, device=dev)
    if layout is None:
        layout = layout_from_element_mask(m, bs, causal=causal)
    elif not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or tuple(layout.shape[1:]) != (nbq, nbk) \
            or layout.shape[0] not in (1, hm):
        raise KernelArgumentError(f"layout: expected a bool ({hm} or 1, {nbq}, {nbk}) tensor, got {describe(layout)}")
    layout = layout.to(dev)
    kept = m & valid  # (hm, lq, lk)
    n_valid = int(valid.sum())
    kept_h = kept.sum((1, 2)).double()  # (hm,)
    vis = causal_block_mask(nbq, nbk, lq, lk, bs, device=dev) if causal else torch.ones(nbq, nbk, dtype=torch.bool, device=dev)
    n_vis = int(vis.sum())
    blk_h = (layout & vis).sum((1, 2)).double()  # (hl,)
    covered = dense_mask_from_layout(layout, lq, bs, False, lk) & valid  # (hl, lq, lk)
    cov_h = covered.sum((1, 2)).double()
    empty_rows = int((~kept.any(-1)).sum())
    el = kept_h / max(n_valid, 1)
    bl = blk_h / max(n_vis, 1)
    cv = cov_h / max(n_valid, 1)
    return {
        "element_density": float(el.mean()),
        "element_sparsity": 1.0 - float(el.mean()),
        "grid_pruned_fraction": 1.0 - float(kept_h.sum()) / (hm * lq * lk),
        "block_density": float(bl.mean()),
        "block_sparsity": 1.0 - float(bl.mean()),
        "covered_density": float(cv.mean()),
        "fully_pruned_rows": empty_rows,
        "rows": hm * lq,
        "block_size": bs,
        "causal": bool(causal),
        "per_head": {"element_density": el.tolist(), "block_density": bl.tolist(), "covered_density": cv.tolist()},
    }


def fully_pruned_rows(element_mask=None, layout: torch.Tensor | None = None, block_size: int | None = None, *,
                      causal: bool = False, key_padding_mask: torch.Tensor | None = None, lq: int | None = None,
                      lk: int | None = None) -> torch.Tensor:
    """bool ``(B or 1, H, Lq)``: rows with no kept entry, i.e. no key that is in a kept block (``layout``),
    kept by ``element_mask``, causally visible and real (``key_padding_mask``).  These are the rows the
    kernel's ``empty_rows`` mode applies to; ``.sum()`` is the count the AP log reports (pitfall 11).
    Give ``lq, lk`` when there is no element mask.  O(H Lq Lk) work: for logging, not per step."""
    if element_mask is not None:
        m = _check_mask(element_mask)
        lq, lk = m.shape[1], m.shape[2]
    else:
        if lq is None or lk is None:
            raise KernelArgumentError("fully_pruned_rows: pass lq and lk when there is no element_mask")
        m = torch.ones(1, lq, lk, dtype=torch.bool, device=None if layout is None else layout.device)
    if layout is not None:
        _check_bs(block_size)
        m = m.to(layout.device) & dense_mask_from_layout(layout, lq, block_size, False, lk)
    if causal:
        m = m & causal_element_mask(lq, lk, m.device)
    m = m[None]  # (1, H, lq, lk)
    if key_padding_mask is not None:
        m = m & key_padding_mask.to(m.device)[:, None, None, :]
    return ~m.any(-1)


_FLOPS_PER_ENTRY_PER_D = {
    "fwd": 4,  # QK^T and PV: 2 multiply-adds
    "bwd": 10,  # useful backward: dQ (QK^T recompute, dO V^T, dS K) + dK/dV (P^T dO, dS^T Q)
    "fwd_bwd": 14,  # 3.5x fwd: the convention of docs/perf.md
    "bwd_executed": 14,  # the dK/dV kernel also recomputes QK^T and dO V^T
    "fwd_bwd_executed": 18,
}


def block_sparse_flops(layout: torch.Tensor, block_size: int, batch: int, head_dim: int, causal: bool = False,
                       lq: int | None = None, lk: int | None = None, *, n_heads: int | None = None,
                       part: str = "fwd") -> int:
    """FLOPs (2 per multiply-add) the block-sparse kernel computes for ``layout``.

    ``kept blocks x 4 x bs x bs x D`` per head per batch element for the forward, where the kept blocks are
    the LUT's: the layout minus the blocks fully above the causal diagonal (a diagonal block is computed
    whole, masked entries included).  Partial last blocks (odd lengths) count whole too: that is what
    the kernel multiplies.  ``lq, lk`` default to full blocks (they matter for a causal rectangular
    layout).  A broadcast ``(1, nbq, nbk)`` layout counts ``n_heads`` times (default 1).  ``part``: one
    of ``fwd`` (4), ``bwd`` (10, useful), ``fwd_bwd`` (14), ``bwd_executed`` (14), ``fwd_bwd_executed``
    (18) FLOPs per kept score entry per head-dim unit.  An element mask does not change it (compute is
    skipped per block only).
    """
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() != 3:
        raise KernelArgumentError(f"layout: expected a bool (H or 1, nbq, nbk) tensor, got {describe(layout)}")
    _check_bs(block_size)
    for name, x in (("batch", batch), ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise KernelArgumentError(f"{name}: expected a non-negative int, got {describe(x)}")
    if not isinstance(causal, bool):
        raise KernelArgumentError(f"causal: expected True or False, got {describe(causal)}")
    if part not in _FLOPS_PER_ENTRY_PER_D:
        raise KernelArgumentError(f"part: expected one of {tuple(_FLOPS_PER_ENTRY_PER_D)}, got {part!r}")
    hl, nbq, nbk = layout.shape
    lq = nbq * block_size if lq is None else lq
    lk = nbk * block_size if lk is None else lk
    if math.ceil(lq / block_size) != nbq or math.ceil(lk / block_size) != nbk:
        raise KernelArgumentError(
            f"layout: shape {tuple(layout.shape)} does not match lq={lq}, lk={lk} at block_size={block_size}")
    if n_heads is not None and hl != 1 and n_heads != hl:
        raise KernelArgumentError(f"n_heads: the layout has {hl} heads, got n_heads={n_heads}")
    heads = hl if hl != 1 else (1 if n_heads is None else n_heads)
    eff = _effective_layout(layout.detach().cpu(), causal, (lq, lk, block_size))
    nnz = int(eff.sum()) * (heads // hl)
    return nnz * batch * block_size * block_size * head_dim * _FLOPS_PER_ENTRY_PER_D[part]

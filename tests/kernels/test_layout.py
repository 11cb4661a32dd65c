"""Tests for kernels.layout: LUTs, cache, generators."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from kernels.layout import (  # noqa: E402
    bigbird_layout,
    build_lut,
    causal_block_mask,
    clear_lut_cache,
    dense_mask_from_layout,
    get_lut,
    layout_density,
    local_layout,
    longformer_layout,
    random_layout,
    slice_layout,
    strided_layout,
    validate_layout,
)


def _csr_from_nonzero(lay):
    hl, nb, _ = lay.shape
    rows = []
    for h in range(hl):
        for i in range(nb):
            rows.append(torch.nonzero(lay[h, i]).flatten().tolist())
    return rows


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("causal", [False, True])
def test_lut_matches_nonzero(seed, causal):
    g = torch.Generator().manual_seed(seed)
    hl = [1, 3][seed % 2]
    nb = int(torch.randint(1, 12, (1,), generator=g))
    lay = torch.rand(hl, nb, nb, generator=g) < [0.0, 0.3, 0.7, 1.0][seed % 4]
    lut = build_lut(lay, causal)
    eff = lay & torch.ones(nb, nb, dtype=torch.bool).tril() if causal else lay
    assert lut.nnz == int(eff.sum())
    assert lut.row_ptr.dtype == torch.int32 and lut.col_idx.dtype == torch.int32
    assert lut.row_ptr.numel() == hl * nb + 1 and lut.col_idx.numel() == lut.nnz + 1
    # CSR rows
    rp, ci = lut.row_ptr.tolist(), lut.col_idx.tolist()
    for r, cols in enumerate(_csr_from_nonzero(eff)):
        assert ci[rp[r]:rp[r + 1]] == cols
    # CSC columns == CSR of the transposed layout
    cp, ri = lut.col_ptr.tolist(), lut.row_idx.tolist()
    for c, rows in enumerate(_csr_from_nonzero(eff.transpose(1, 2))):
        assert ri[cp[c]:cp[c + 1]] == rows
    assert lut.max_row_nnz == (int(eff.sum(-1).max()) if eff.numel() else 0)
    assert lut.max_col_nnz == (int(eff.sum(-2).max()) if eff.numel() else 0)


def test_lut_cache_hit_and_invalidation():
    clear_lut_cache()
    lay = random_layout(2, 6, 0.4, torch.Generator().manual_seed(0))
    a = get_lut(lay)
    assert get_lut(lay) is a  # cache hit: same object
    assert get_lut(lay, causal=True) is not a  # causal is part of the key
    same_content = lay.clone()
    assert get_lut(same_content) is a  # content-keyed: equal layouts share one entry
    lay[0, 0, 5] = not bool(lay[0, 0, 5])  # in-place edit -> rebuilt
    b = get_lut(lay)
    assert b is not a
    assert b.nnz == int(lay.sum())
    assert get_lut(same_content) is a  # the other tensor still has the old content


def _flip(t, idx):
    t[idx] = not bool(t[idx])


@pytest.mark.parametrize("how", ["data", "numpy", "detach"])
def test_lut_cache_sees_untracked_edits(how):
    """Edits that do not bump layout._version (the old cache key) must still be seen."""
    clear_lut_cache()
    lay = random_layout(1, 5, 0.4, torch.Generator().manual_seed(3))
    a = get_lut(lay)
    v0 = lay._version
    if how == "data":
        _flip(lay.data, (0, 0, 4))
    elif how == "numpy":
        _flip(lay.numpy(), (0, 0, 4))
    else:
        _flip(lay.detach().numpy(), (0, 0, 4))
    if how != "detach":
        assert lay._version == v0  # the edit is invisible to the version counter
    b = get_lut(lay)
    assert b is not a and b.nnz == int(lay.sum())
    ref = build_lut(lay.clone())
    assert torch.equal(b.col_idx, ref.col_idx) and torch.equal(b.row_ptr, ref.row_ptr)


def test_lut_cache_fresh_views_and_recycled_memory():
    """A fresh view of the same memory per call (slice_layout) hits the cache; a different layout at a
    recycled address never does (the bytes are compared, not the address)."""
    from kernels.layout import _CACHE_STATS

    clear_lut_cache()
    big = random_layout(2, 8, 0.5, torch.Generator().manual_seed(0))
    a = get_lut(slice_layout(big, 40, 70, 16))
    misses = _CACHE_STATS["misses"]
    assert get_lut(slice_layout(big, 40, 70, 16)) is a and _CACHE_STATS["misses"] == misses
    for seed in range(4):  # allocate / free layouts of one size: addresses get reused
        lay = random_layout(1, 6, 0.5, torch.Generator().manual_seed(seed))
        assert get_lut(lay).nnz == int(lay.sum())
        assert torch.equal(get_lut(lay).col_idx, build_lut(lay).col_idx)
        del lay


def test_lut_of_inference_mode_layout():
    """A layout made under torch.inference_mode() has no version counter; get_lut used to crash on it."""
    clear_lut_cache()
    with torch.inference_mode():
        lay = random_layout(2, 4, 0.5, torch.Generator().manual_seed(1))
    a = get_lut(lay)
    assert a.nnz == int(lay.sum())
    with torch.inference_mode():
        lay[0, 0, 3] = not bool(lay[0, 0, 3])
        b = get_lut(lay)
    assert b.nnz == int(lay.sum()) and b is not a


def test_lut_rectangular_and_causal_geometry():
    """Rectangular layouts: CSR over nbq rows, CSC over nbk columns; causal trims with the bottom-right
    diagonal (query i sees keys j <= i + lk - lq) at block granularity."""
    g = torch.Generator().manual_seed(5)
    for lq, lk, bs in [(40, 70, 16), (70, 40, 16), (33, 33, 16), (16, 100, 32), (100, 16, 32)]:
        nbq, nbk = math.ceil(lq / bs), math.ceil(lk / bs)
        lay = torch.rand(2, nbq, nbk, generator=g) < 0.7
        for causal in (False, True):
            lut = build_lut(lay, causal, lq=lq, lk=lk, block_size=bs)
            assert (lut.nbq, lut.nbk) == (nbq, nbk)
            assert lut.row_ptr.numel() == 2 * nbq + 1 and lut.col_ptr.numel() == 2 * nbk + 1
            elem = dense_mask_from_layout(lay, lq, bs, causal, lk)  # (2, lq, lk), bottom-right causal
            # a block is in the LUT iff it holds a visible kept element
            blk = torch.zeros(2, nbq * bs, nbk * bs, dtype=torch.int32)
            blk[:, :lq, :lk] = elem
            eff = blk.view(2, nbq, bs, nbk, bs).sum((2, 4)) > 0
            assert lut.nnz == int(eff.sum())
            rp, ci = lut.row_ptr.tolist(), lut.col_idx.tolist()
            for r, cols in enumerate(_csr_from_nonzero(eff)):
                assert ci[rp[r]:rp[r + 1]] == cols
            cp, ri = lut.col_ptr.tolist(), lut.row_idx.tolist()
            for c, rows in enumerate(_csr_from_nonzero(eff.transpose(1, 2))):
                assert ri[cp[c]:cp[c + 1]] == rows
    # causal geometry is part of the cache key (same layout content, different lengths)
    clear_lut_cache()
    lay = torch.ones(1, 3, 3, dtype=torch.bool)
    a = get_lut(lay, True, lq=48, lk=48, block_size=16)
    b = get_lut(lay, True, lq=33, lk=48, block_size=16)
    assert a.nnz == 6 and b.nnz == 8 and a is not b  # lq < lk shifts the diagonal right by 15 keys (2+3+3)


def test_validate_layout_errors():
    ok = torch.ones(1, 4, 4, dtype=torch.bool)
    assert validate_layout(ok, 2, 4) is ok
    validate_layout(torch.ones(2, 4, 4, dtype=torch.bool), 2, 4)
    for bad in (ok.float(), torch.ones(3, 4, 4, dtype=torch.bool), torch.ones(1, 4, 5, dtype=torch.bool),
                torch.ones(4, 4, dtype=torch.bool), "layout"):
        with pytest.raises(ValueError, match="layout"):
            validate_layout(bad, 2, 4)
    rect = torch.ones(2, 3, 5, dtype=torch.bool)
    assert validate_layout(rect, 2, 3, 5) is rect
    with pytest.raises(ValueError, match=r"layout: expected shape \(2, 5, 3\)"):
        validate_layout(rect, 2, 5, 3)


def test_slice_layout_and_causal_block_mask():
    big = random_layout(2, 8, 0.5, torch.Generator().manual_seed(0))
    s = slice_layout(big, 40, 70, 16)
    assert s.shape == (2, 3, 5) and torch.equal(s, big[:, :3, :5])
    with pytest.raises(ValueError, match="layout"):
        slice_layout(big, 200, 16, 16)
    assert torch.equal(causal_block_mask(4, 4, 64, 64, 16), torch.ones(4, 4, dtype=torch.bool).tril())
    # lq=20, lk=50, bs=16: offset 30; block row 0 (rows 0-15) sees keys <= 45 -> key blocks 0..2
    m = causal_block_mask(2, 4, 20, 50, 16)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    # lq=50, lk=20: offset -30; rows 0-15 see nothing, rows 16-31 see keys <= 1 (block 0)
    m = causal_block_mask(4, 2, 50, 20, 16)
    assert m.tolist() == [[False, False], [True, False], [True, True], [True, True]]


def test_dense_mask_from_layout():
    lay = torch.tensor([[[True, False], [False, True]]])
    m = dense_mask_from_layout(lay, 3, 2)
    assert m.shape == (1, 3, 3)
    assert m[0].tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    mc = dense_mask_from_layout(torch.ones(1, 2, 2, dtype=torch.bool), 3, 2, causal=True)
    assert torch.equal(mc[0], torch.ones(3, 3, dtype=torch.bool).tril())


@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_random_layout_density(density):
    g = torch.Generator().manual_seed(1)
    nb = 16
    lay = random_layout(4, nb, density, g)
    assert lay.shape == (4, nb, nb) and lay.dtype == torch.bool
    assert lay.diagonal(dim1=1, dim2=2).all()
    expect = max(round(density * nb * nb), nb) / (nb * nb)
    for h in range(4):
        assert layout_density(lay[h:h + 1]) == pytest.approx(expect)
    nodiag = random_layout(1, nb, density, g, keep_diagonal=False)
    assert int(nodiag.sum()) == round(density * nb * nb)
    assert not torch.equal(lay[0], lay[1]) or density in (0.0, 1.0) or density * nb * nb <= nb


def test_local_longformer_bigbird_strided():
    nb = 10
    loc = local_layout(nb, 1)
    assert loc.shape == (1, nb, nb) and loc.dtype == torch.bool
    assert int(loc.sum()) == nb + 2 * (nb - 1)
    assert torch.equal(local_layout(nb, 0)[0], torch.eye(nb, dtype=torch.bool))
    lf = longformer_layout(nb, 1, 2)
    assert lf[0, :2].all() and lf[0, :, :2].all() and (lf[0] >= loc[0]).all()
    assert int(lf.sum()) == int((loc[0] | _glob(nb, 2)).sum())
    bb = bigbird_layout(nb, 1, 1, 2, torch.Generator().manual_seed(0))
    base = longformer_layout(nb, 1, 1)[0]
    assert (bb[0] >= base).all()
    extra = (bb[0] & ~base).sum(-1)
    free = (~base).sum(-1)
    assert torch.equal(extra, torch.minimum(free, torch.full_like(free, 2)))
    st = strided_layout(nb, 2, 3)
    assert st.shape == (1, nb, nb)
    assert st[0].diagonal().all()
    assert st[0, :, 2].all() and st[0, :, 5].all() and st[0, :, 8].all()
    assert not st[0, 0, 4]


def _glob(nb, g):
    m = torch.zeros(nb, nb, dtype=torch.bool)
    m[:g] = True
    m[:, :g] = True
    return m


def test_layout_density_causal():
    nb = 8
    full = torch.ones(1, nb, nb, dtype=torch.bool)
    assert layout_density(full) == 1.0
    assert layout_density(full, causal=True) == 1.0
    diag = torch.eye(nb, dtype=torch.bool)[None]
    assert layout_density(diag) == pytest.approx(1 / nb)
    assert layout_density(diag, causal=True) == pytest.approx(nb / (nb * (nb + 1) / 2))
    assert math.isclose(layout_density(local_layout(nb, 1)), (nb + 2 * (nb - 1)) / nb ** 2)

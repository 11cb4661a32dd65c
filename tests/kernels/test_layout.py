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
    clear_lut_cache,
    dense_mask_from_layout,
    get_lut,
    layout_density,
    local_layout,
    longformer_layout,
    random_layout,
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
    assert get_lut(same_content) is not a  # identity-keyed (documented)
    lay[0, 0, 5] = not bool(lay[0, 0, 5])  # in-place edit bumps _version -> rebuilt
    b = get_lut(lay)
    assert b is not a
    assert b.nnz == int(lay.sum())


def test_validate_layout_errors():
    ok = torch.ones(1, 4, 4, dtype=torch.bool)
    assert validate_layout(ok, 2, 4) is ok
    validate_layout(torch.ones(2, 4, 4, dtype=torch.bool), 2, 4)
    for bad in (ok.float(), torch.ones(3, 4, 4, dtype=torch.bool), torch.ones(1, 4, 5, dtype=torch.bool),
                torch.ones(4, 4, dtype=torch.bool), "layout"):
        with pytest.raises(ValueError, match="layout"):
            validate_layout(bad, 2, 4)


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

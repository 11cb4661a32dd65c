"""Tests for kernels.moe_ffn (CPU: Triton kernels under TRITON_INTERPRET=1; the same tests run on CUDA)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.block_sparse_attention import HAS_TRITON  # noqa: E402
from kernels.moe_ffn import (  # noqa: E402
    PRESETS,
    grouped_mm_ffn,
    grouped_mm_info,
    main,
    moe_dispatch,
    moe_ffn,
    moe_ffn_flops,
    moe_ffn_reference,
    permute_hidden,
    run_sweep,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = HAS_TRITON and (DEV == "cuda" or importlib.import_module("kernels.block_sparse_attention")._INTERPRET)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton (CUDA or TRITON_INTERPRET=1) not available")
COMBINES = ("hidden", "pairs", "auto")


def make_ffn(T, D, d_ff, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    W1 = torch.randn(d_ff, D, generator=g) / D ** 0.5
    b1 = 0.3 * torch.randn(d_ff, generator=g)
    W2 = torch.randn(D, d_ff, generator=g) / d_ff ** 0.5
    b2 = torch.randn(D, generator=g)
    return [t.to(DEV, dtype) for t in (x, W1, b1, W2, b2)]


def dense_masked(x, W1, b1, W2, b2, sel, E, perm=None):
    """Independent oracle in fp64: the dense hidden layer, units of unselected experts zeroed."""
    d_ff = W1.shape[0]
    de = d_ff // E
    h = torch.relu(F.linear(x.double(), W1.double(), b1.double()))  # (T, d_ff), original unit order
    owner = torch.arange(d_ff, device=x.device) // de  # expert of each unit in expert order
    if perm is not None:
        unit_owner = torch.empty_like(owner)
        unit_owner[perm.to(x.device)] = owner  # original unit perm[i] belongs to expert i // de
        owner = unit_owner
    mask = sel[:, owner]  # (T, d_ff)
    return F.linear(h * mask, W2.double(), b2.double())


def make_sel(T, E, case, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    if case == "ragged":  # a varying number of experts per token, skewed expert loads
        p = torch.linspace(0.05, 0.9, E)[None, :].expand(T, E)
        sel = torch.rand(T, E, generator=g) < p
    elif case == "empty_experts":
        sel = torch.rand(T, E, generator=g) < 0.5
        sel[:, ::3] = False
    elif case == "empty_tokens":
        sel = torch.rand(T, E, generator=g) < 0.5
        sel[::2] = False
    elif case == "all":
        sel = torch.ones(T, E, dtype=torch.bool)
    elif case == "none":
        sel = torch.zeros(T, E, dtype=torch.bool)
    else:
        raise ValueError(case)
    return sel.to(DEV)


# (T, d_model, d_ff, E, case): ragged loads, empty experts, empty tokens, all on, T=1, odd sizes
# (d_model not a multiple of the K tile, d_e = 5 / 7 / 24, more tokens than one tile)
CASES = [
    (37, 48, 96, 4, "ragged"),  # d_e = 24
    (29, 32, 64, 8, "empty_experts"),
    (18, 40, 48, 6, "empty_tokens"),
    (21, 24, 48, 3, "all"),
    (1, 32, 96, 4, "ragged"),
    (1, 16, 32, 2, "all"),
    (11, 37, 35, 7, "ragged"),  # d_e = 5, d_model = 37
    (40, 19, 21, 3, "empty_tokens"),  # d_e = 7
]


@pytest.mark.parametrize("T,D,d_ff,E,case", CASES)
def test_reference_equals_masked_dense_fp64(T, D, d_ff, E, case):
    x, W1, b1, W2, b2 = make_ffn(T, D, d_ff, torch.float64)
    sel = make_sel(T, E, case)
    y = moe_ffn(x, W1, b1, W2, b2, sel, E, backend="torch")
    assert y.dtype == torch.float64 and y.shape == (T, D)
    torch.testing.assert_close(y, dense_masked(x, W1, b1, W2, b2, sel, E), rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("T,D,d_ff,E,case", CASES)
def test_triton_vs_reference_vs_dense(T, D, d_ff, E, case, combine):
    x, W1, b1, W2, b2 = make_ffn(T, D, d_ff, torch.float32, seed=T + E)
    sel = make_sel(T, E, case, seed=T)
    y = moe_ffn(x, W1, b1, W2, b2, sel, E, backend="triton", combine=combine)
    ref = moe_ffn_reference(x, W1, b1, W2, b2, sel, E)
    assert y.dtype == torch.float32 and y.shape == (T, D)
    tol = 1e-5 if DEV == "cpu" or not torch.backends.cuda.matmul.allow_tf32 else 2e-3
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y.double(), dense_masked(x, W1, b1, W2, b2, sel, E), rtol=tol, atol=tol)
    if case == "empty_tokens":  # a token with no expert gets exactly b2
        assert torch.equal(y[::2], b2.expand(y[::2].shape))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_OK else []))
def test_split_identity_all_experts_is_dense(backend):
    """All experts on == the dense FFN, for any permutation of the hidden units (spec U1)."""
    T, D, d_ff, E = 19, 32, 96, 4
    x, W1, b1, W2, b2 = make_ffn(T, D, d_ff)
    perm = torch.randperm(d_ff, generator=torch.Generator().manual_seed(3)).to(DEV)
    sel = make_sel(T, E, "all")
    dense = F.linear(torch.relu(F.linear(x, W1, b1)), W2, b2)
    y = moe_ffn(x, W1, b1, W2, b2, sel, E, backend=backend, perm=perm)
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
    # pre-permuted weights (what a converted model stores) give the same thing without perm
    W1p, b1p, W2p = permute_hidden(W1, b1, W2, perm)
    torch.testing.assert_close(moe_ffn(x, W1p, b1p, W2p, b2, sel, E, backend=backend), dense, rtol=1e-5, atol=1e-5)
    # and a partial selection with perm equals the masked dense computation with perm
    sel = make_sel(T, E, "ragged")
    y = moe_ffn(x, W1, b1, W2, b2, sel, E, backend=backend, perm=perm)
    torch.testing.assert_close(y.double(), dense_masked(x, W1, b1, W2, b2, sel, E, perm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_OK else []))
def test_no_expert_anywhere_gives_b2(backend):
    x, W1, b1, W2, b2 = make_ffn(5, 16, 32)
    y = moe_ffn(x, W1, b1, W2, b2, make_sel(5, 4, "none"), 4, backend=backend)
    assert torch.equal(y, b2.expand(5, 16))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_OK else []))
def test_dispatch_hand_case(backend):
    sel = torch.tensor([[1, 0, 1],
                        [0, 0, 1],
                        [1, 1, 1],
                        [0, 0, 0],
                        [0, 1, 0]], dtype=torch.bool, device=DEV)
    d = moe_dispatch(sel, backend=backend)
    assert d.counts.tolist() == [2, 2, 3]
    assert d.offsets.tolist() == [0, 2, 4, 7]
    assert d.n_pairs() == 7
    assert d.pair_token.shape == (15,)
    # grouped by expert, tokens ascending inside an expert
    assert d.pair_token[:7].tolist() == [0, 2, 2, 4, 0, 1, 2]
    assert d.pair_index.shape == (5, 3)
    assert d.pair_index.tolist() == [[0, -1, 4],
                                         [-1, -1, 5],
                                         [1, 2, 6],
                                         [-1, -1, -1],
                                         [-1, 3, -1]]
    for t in (d.counts, d.offsets, d.pair_token, d.pair_index):
        assert t.dtype == torch.int32 and t.device.type == sel.device.type


@needs_triton
def test_dispatch_triton_matches_torch_on_random_selection():
    """Several dispatch blocks (T > 128 tokens), E not a power of two."""
    sel = torch.rand(300, 10, generator=torch.Generator().manual_seed(1)) < 0.3
    sel[:, 4] = False
    sel = sel.to(DEV)
    a, b = moe_dispatch(sel, backend="triton"), moe_dispatch(sel, backend="torch")
    P = a.n_pairs()
    assert P == int(sel.sum())
    for name in ("counts", "offsets", "pair_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.pair_token[:P], b.pair_token[:P])


@needs_triton
@pytest.mark.parametrize("combine", COMBINES)
def test_triton_deterministic(combine):
    x, W1, b1, W2, b2 = make_ffn(33, 32, 64)
    sel = make_sel(33, 8, "ragged")
    y1 = moe_ffn(x, W1, b1, W2, b2, sel, 8, backend="triton", combine=combine)
    y2 = moe_ffn(x, W1, b1, W2, b2, sel, 8, backend="triton", combine=combine)
    assert torch.equal(y1, y2)


@needs_triton
def test_triton_bf16_and_leading_dims():
    x, W1, b1, W2, b2 = make_ffn(12, 32, 48, torch.bfloat16)
    x = x.view(3, 4, 32)
    sel = make_sel(12, 2, "ragged").view(3, 4, 2)
    y = moe_ffn(x, W1, b1, W2, b2, sel, 2, backend="triton")
    assert y.shape == (3, 4, 32) and y.dtype == torch.bfloat16
    ref = moe_ffn_reference(x, W1, b1, W2, b2, sel, 2)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_flops_hand_count():
    # d_model 8, d_ff 12, 3 experts of d_e 4; 3 tokens with 2, 0 and 3 experts -> 5 pairs
    sel = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    fl = moe_ffn_flops(sel, 8, 12, 3)
    per_pair = 2 * 8 * 4 + 4 + 2 * 4 * 8  # W1 GEMM (mul + add) + b1 + W2 GEMM; ReLU free
    assert per_pair == 132
    assert fl["pairs"] == 5 and fl["tokens"] == 3 and fl["d_e"] == 4
    assert fl["moe_flops"] == 5 * 132 + 3 * 8 == 684  # + b2 once per token
    assert fl["dense_flops"] == 3 * (2 * 8 * 12 * 2 + 12 + 8) == 1212
    assert fl["moe_macs"] == 5 * 2 * 8 * 4 and fl["dense_macs"] == 3 * 2 * 8 * 12
    assert fl["ratio"] == pytest.approx(684 / 1212)
    # all experts on == dense, exactly
    full = moe_ffn_flops(torch.ones(7, 3, dtype=torch.bool), 8, 12, 3)
    assert full["moe_flops"] == full["dense_flops"]


def test_validation_errors():
    x, W1, b1, W2, b2 = make_ffn(4, 16, 32)
    sel = make_sel(4, 4, "ragged")
    with pytest.raises(ValueError, match="n_experts"):
        moe_ffn(x, W1, b1, W2, b2, make_sel(4, 3, "ragged"), 3, backend="torch")
    with pytest.raises(ValueError, match="sel"):
        moe_ffn(x, W1, b1, W2, b2, sel[:, :2], 4, backend="torch")
    with pytest.raises(ValueError, match="sel"):
        moe_ffn(x, W1, b1, W2, b2, sel.int(), 4, backend="torch")
    with pytest.raises(ValueError, match="W2"):
        moe_ffn(x, W1, b1, W2.t(), b2, sel, 4, backend="torch")
    with pytest.raises(ValueError, match="dtype"):
        moe_ffn(x, W1.double(), b1, W2, b2, sel, 4, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        moe_ffn(x, W1, b1, W2, b2, sel, 4, backend="cuda")
    if TRITON_OK:
        with pytest.raises(NotImplementedError, match="forward only"):
            moe_ffn(x.requires_grad_(), W1, b1, W2, b2, sel, 4, backend="triton")


def test_torch_backend_is_differentiable():
    x, W1, b1, W2, b2 = make_ffn(6, 16, 32, torch.float64)
    W1.requires_grad_()
    sel = make_sel(6, 4, "ragged")
    moe_ffn(x, W1, b1, W2, b2, sel, 4, backend="torch").sum().backward()
    assert W1.grad is not None and torch.isfinite(W1.grad).all()


def test_grouped_mm_baseline_matches_reference():
    """The sweep's torch._grouped_mm baseline, on whatever device the tests run (skipped where the op
    or its dtype is not available)."""
    info = grouped_mm_info()
    if not info["available"]:
        pytest.skip("torch._grouped_mm not in this PyTorch")
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    x, W1, b1, W2, b2 = make_ffn(20, 32, 64, dtype)
    sel = make_sel(20, 4, "ragged")
    try:
        y = grouped_mm_ffn(x, W1, b1, W2, b2, sel, 4)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._grouped_mm unusable here: {exc}")
    ref = moe_ffn_reference(x, W1, b1, W2, b2, sel, 4)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_sweep_smoke_torch_backend(tmp_path):
    """The sweep's CPU preset (torch backend, toy sizes) and its CLI; never the GPU sweep."""
    rows = run_sweep(PRESETS["tiny"], torch.device("cpu"), log=lambda s: None)
    kinds = {r["kernel"] for r in rows}
    assert kinds == {"dense", "moe_torch"}
    moe = [r for r in rows if r["kernel"] == "moe_torch"]
    assert moe and all(r["ms"] > 0 and r["check_rel_err"] < 1e-5 and r["speedup_vs_dense"] > 0 for r in moe)
    for key in ("model", "d_model", "d_ff", "d_e", "E", "T", "fraction", "pairs", "flops", "tflops"):
        assert key in moe[0]
    out = tmp_path / "sweep.json"
    assert main(["--sweep", str(out), "--preset", "tiny"]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "moe_ffn_sweep" and doc["rows"] and doc["config"]["kernels"] == ["dense", "moe_torch"]
    assert "grouped_mm" in doc["env"]


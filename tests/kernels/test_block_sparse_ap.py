"""What Attention Pruning needs from the block-sparse kernel (spec attention_pruning.md §3.3, §7 unit 3):
rectangular layouts (cross-attention, Lq != Lk), causal with the bottom-right diagonal, per-head layouts,
an intra-block element mask, the ``empty_rows`` rule for fully pruned rows, plus the mask utilities, the FLOP
helper and the argument checks (reliability fixes).

Oracle: an explicit dense (B, H, Lq, Lk) attention built here in float64 from (layout, causal, padding, element
mask), independent of the module.  ``empty_rows="uniform"`` is checked against the *finite-fill* dense masking
of the original AP code (pruned scores -> a huge negative constant, padding / causal -> -inf), so the fallback
rows come out of the softmax, not out of a copy of the kernel's formula.  Tolerance rule as in
test_block_sparse_attention.py: err(kernel, fp64) <= 2x (out) / 3x (grads) err(same-precision dense, fp64),
with the same one-ulp floor.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import (  # noqa: E402
    KernelArgumentError,
    attention_stats,
    block_sparse_attention,
    block_sparse_flops,
    build_lut,
    fully_pruned_rows,
    layout_from_element_mask,
    mask_sparsity,
    pack_element_mask,
)
from kernels.block_sparse_attention import (  # noqa: E402
    HAS_TRITON,
    _triton_backward,
    _triton_forward,
    block_sparse_attention_reference,
)
from kernels.layout import clear_lut_cache, get_lut  # noqa: E402

BSA = importlib.import_module("kernels.block_sparse_attention")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = HAS_TRITON and (DEV == "cuda" or BSA._INTERPRET)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton unavailable (needs CUDA or TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------------------
# independent dense oracle
# ----------------------------------------------------------------------------------------
def upsample(layout, bs, lq, lk):
    return layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :lq, :lk]


def causal_vis(lq, lk, device):
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def dense_ap(q, k, v, layout, bs, causal=False, kpm=None, em=None, empty_rows="zero", mode="renorm"):
    """Explicit masked attention, every op in q's dtype."""
    B, H, lq, D = q.shape
    lk = k.shape[2]
    kept = upsample(layout.to(q.device), bs, lq, lk)[None]  # (1, Hl, lq, lk)
    if em is not None:
        kept = kept & em.to(q.device)[None]
    valid = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        valid = valid & causal_vis(lq, lk, q.device)
    if kpm is not None:
        valid = valid & kpm[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    if mode == "phantom_zero":  # spion.md §7.7: pruned logits -> 0 in the denominator, padded kept keys excluded
        s = torch.where(kept, s, torch.zeros_like(s)).masked_fill(kept & ~valid, float("-inf"))
        s = torch.where((valid | ~kept).any(-1, keepdim=True), s, torch.zeros_like(s))  # no finite logit: 0
        return (torch.softmax(s, -1) * (kept & valid)) @ v
    if empty_rows == "zero":
        live = kept & valid
        s = s.masked_fill(~live, float("-inf"))
    else:  # AP's finite fill: pruned -> huge negative constant (min/2: no fp16 overflow), invalid -> -inf
        live = valid.expand_as(s)
        s = s.masked_fill(~kept, torch.finfo(q.dtype).min / 2).masked_fill(~valid, float("-inf"))
    s = torch.where(live.any(-1, keepdim=True), s, torch.zeros_like(s))  # rows with nothing: 0 output
    p = torch.softmax(s, -1) * live
    return p @ v


def grads(fn, q, k, v, do, dtype):
    qs, ks, vs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(qs, ks, vs)
    dq, dk, dv = torch.autograd.grad(out, (qs, ks, vs), do.to(dtype))
    return [out, dq, dk, dv]


def check_rule(res, same, ref, names=("out", "dq", "dk", "dv")):
    for name, r, s, o in zip(names, res, same, ref):
        assert not torch.isnan(r).any(), f"{name}: NaN"
        eps = torch.finfo(r.dtype).eps
        floor = max(1e-6, eps) * max(1.0, o.abs().max().item())
        err = (r.double() - o).abs().max().item()
        err_same = (s.double() - o).abs().max().item()
        c = 2.0 if name == "out" else 3.0
        assert err <= c * max(err_same, floor), f"{name}: err {err:.3e} > {c} x same-precision {err_same:.3e}"


def make_case(seed, B, H, lq, lk, D, bs, *, per_head=True, pad=False, em_kind=None, density=0.55, device=DEV):
    g = torch.Generator().manual_seed(seed)
    nbq, nbk = math.ceil(lq / bs), math.ceil(lk / bs)
    hl = H if per_head else 1
    lay = torch.rand(hl, nbq, nbk, generator=g) < density
    if nbq > 1:
        lay[:, 0] = False  # an empty block row
    if nbk > 2:
        lay[:, :, nbk - 1] = False  # an empty block column
    q = torch.randn(B, H, lq, D, generator=g, dtype=torch.float64)
    k, v = [torch.randn(B, H, lk, D, generator=g, dtype=torch.float64) for _ in range(2)]
    do = torch.randn(B, H, lq, D, generator=g, dtype=torch.float64)
    kpm = None
    if pad:
        kpm = torch.rand(B, lk, generator=g) > 0.25
        kpm[0, lk // 2:] = False  # a long padded tail
        if B > 1:
            kpm[1] = False  # an all-padding sequence: every row empty
    em = None
    if em_kind is not None:
        hm = H if em_kind == "per_head" else 1
        em = torch.rand(hm, lq, lk, generator=g) < 0.6
        em[:, lq // 3] = False  # a fully pruned row (inside kept blocks or not)
        if lq > 4:
            em[:, -2] = False
        em[:, :, : min(lk, 5)] &= torch.rand(hm, lq, 1, generator=g) < 0.5  # ragged zeros at the start
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(do), lay, to(kpm), to(em)


# ----------------------------------------------------------------------------------------
# 1. torch reference (the CPU path) vs the dense fp64 oracle
# ----------------------------------------------------------------------------------------
def _cfg(seed, lmax=90):
    g = torch.Generator().manual_seed(7000 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    lq = int(torch.randint(1, lmax, (1,), generator=g))
    lk = pick([lq, int(torch.randint(1, lmax, (1,), generator=g))])
    return dict(lq=lq, lk=lk, bs=pick([16, 32]), causal=bool(seed % 2), per_head=bool(seed % 3),
                pad=pick([False, True]), em_kind=pick([None, "per_head", "broadcast"]),
                empty_rows=pick(["zero", "uniform"]), packed=pick([False, True]),
                B=pick([1, 2]), H=pick([1, 2]))


@pytest.mark.parametrize("seed", range(24))
def test_reference_matches_dense_fp64(seed):
    c = _cfg(seed)
    q, k, v, do, lay, kpm, em = make_case(seed, c["B"], c["H"], c["lq"], c["lk"], 16, c["bs"], per_head=c["per_head"],
                                          pad=c["pad"], em_kind=c["em_kind"], device="cpu")
    em_arg = pack_element_mask(em) if (em is not None and c["packed"]) else em
    kw = dict(block_size=c["bs"], causal=c["causal"], key_padding_mask=kpm, element_mask=em_arg,
              empty_rows=c["empty_rows"])
    r = grads(lambda a, b, d: block_sparse_attention_reference(a, b, d, lay, **kw), q, k, v, do, torch.float64)
    o = grads(lambda a, b, d: dense_ap(a, b, d, lay, c["bs"], c["causal"], kpm, em, c["empty_rows"]), q, k, v, do,
              torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), r, o):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)
    out = block_sparse_attention(q.float(), k.float(), v.float(), lay, backend="torch", **kw)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), o[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# 2. Triton path (interpreter on CPU), randomized over the AP features
# ----------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.float32, torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("seed", range(36))
def test_triton_ap_randomized(seed):
    c = _cfg(100 + seed, lmax=75)
    dtype = DTYPES[seed % len(DTYPES)]
    D = [16, 32][seed % 2]
    q, k, v, do, lay, kpm, em = make_case(seed, c["B"], c["H"], c["lq"], c["lk"], D, c["bs"], per_head=c["per_head"],
                                          pad=c["pad"], em_kind=c["em_kind"])
    bs, causal, rows = c["bs"], c["causal"], c["empty_rows"]
    fn = lambda a, b, d: dense_ap(a, b, d, lay, bs, causal, kpm, em, rows)  # noqa: E731
    oracle = grads(fn, q, k, v, do, torch.float64)
    same = grads(fn, q, k, v, do, dtype)
    em_arg = pack_element_mask(em) if (em is not None and c["packed"]) else em
    if bs == 32 and seed % 3 == 0 and rows == "zero":
        # internal hook: kernel tiles smaller than the layout block, NaN-poisoned outputs
        qs, ks, vs, dos = [x.to(dtype) for x in (q, k, v, do)]
        lq, lk = qs.shape[2], ks.shape[2]
        lut = get_lut(lay, causal, qs.device, lq=lq, lk=lk, block_size=bs)
        pm = None if em is None else pack_element_mask(em)
        out = torch.full_like(qs, float("nan"))
        lse = torch.full(qs.shape[:3], float("nan"), device=qs.device)
        _triton_forward(qs, ks, vs, lut, kpm, causal, False, D ** -0.5, bs, out=out, lse=lse, cfg=(16, 32, 4, 1),
                        element_mask=pm)
        dq, dk, dv = torch.full_like(qs, float("nan")), torch.full_like(ks, float("nan")), torch.full_like(vs, float("nan"))
        delta = torch.full(qs.shape[:3], float("nan"), device=qs.device)
        _triton_backward(dos, qs, ks, vs, out, lse, lut, kpm, causal, D ** -0.5, bs, dq=dq, dk=dk, dv=dv, delta=delta,
                         cfg_dq=(32, 16, 4, 1), cfg_dkv=(16, 16, 4, 1), element_mask=pm)
        assert not torch.isnan(lse).any() and not torch.isnan(delta).any()
        res = [out, dq, dk, dv]
    else:
        res = grads(lambda a, b, d: block_sparse_attention(
            a, b, d, lay, block_size=bs, causal=causal, key_padding_mask=kpm, element_mask=em_arg, empty_rows=rows,
            backend="triton"), q, k, v, do, dtype)
    for r, x in zip(res, (q, q, k, v)):
        assert r.dtype == dtype and r.shape == x.shape
    check_rule(res, same, oracle)


@needs_triton
@pytest.mark.parametrize("lq,lk", [(45, 64), (80, 45)])
def test_triton_rectangular_causal_poisoned_and_empty(lq, lk):
    """Every element of out / lse / dq / dk / dv / delta is written for rectangular causal attention with an
    element mask, padding and one ragged length (the other a tile multiple: the EVEN_M / EVEN_N split); rows
    with no visible key (lq > lk: the first lq - lk rows) and fully pruned rows give 0 and zero dq; lse is +inf
    exactly there; everything matches the fp64 oracle."""
    B, H, D, bs = 2, 2, 16, 16
    q, k, v, do, lay, kpm, em = make_case(21, B, H, lq, lk, D, bs, pad=True, em_kind="per_head", density=0.7)
    lut = get_lut(lay, True, q.device, lq=lq, lk=lk, block_size=bs)
    pm = pack_element_mask(em)
    out = torch.full_like(q.float(), float("nan"))
    lse = torch.full((B, H, lq), float("nan"), device=q.device)
    qs, ks, vs, dos = [x.float() for x in (q, k, v, do)]
    _triton_forward(qs, ks, vs, lut, kpm, True, False, D ** -0.5, bs, out=out, lse=lse, element_mask=pm)
    dq, dk, dv = torch.full_like(qs, float("nan")), torch.full_like(ks, float("nan")), torch.full_like(vs, float("nan"))
    delta = torch.full((B, H, lq), float("nan"), device=q.device)
    _triton_backward(dos, qs, ks, vs, out, lse, lut, kpm, True, D ** -0.5, bs, dq=dq, dk=dk, dv=dv, delta=delta,
                     element_mask=pm)
    for name, t in dict(out=out, dq=dq, dk=dk, dv=dv, delta=delta, lse=lse).items():
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    empty = fully_pruned_rows(em, lay, bs, causal=True, key_padding_mask=kpm)  # (B, H, lq)
    assert empty.any() and not empty.all()
    assert torch.equal(torch.isinf(lse), empty)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    ref = grads(lambda a, b, c: dense_ap(a, b, c, lay, bs, True, kpm, em), q, k, v, do, torch.float64)
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5, msg=name)


@needs_triton
@pytest.mark.parametrize("lq,lk,bs", [(40, 70, 16), (70, 33, 32)])
def test_triton_phantom_zero_rectangular(lq, lk, bs):
    """SPION's phantom_zero mode with Lq != Lk: the phantom count is Lk - |K_i| (key side), both backends."""
    q, k, v, do, lay, kpm, _ = make_case(31, 2, 2, lq, lk, 16, bs, pad=True)
    fn = lambda a, b, c: dense_ap(a, b, c, lay, bs, False, kpm, mode="phantom_zero")  # noqa: E731
    oracle, same = grads(fn, q, k, v, do, torch.float64), grads(fn, q, k, v, do, torch.float32)
    for backend in ("torch", "triton"):
        res = grads(lambda a, b, c: block_sparse_attention(a, b, c, lay, block_size=bs, key_padding_mask=kpm,
                                                           softmax_mode="phantom_zero", backend=backend),
                    q, k, v, do, torch.float32)
        check_rule(res, same, oracle)


@needs_triton
def test_triton_uniform_fallback_by_hand():
    """empty_rows='uniform': a fully pruned row is the mean of v over its valid keys (real and causally
    visible), dq of that row is 0, and dv_j gets do_i / n_i; 'zero' gives 0 there."""
    B, H, lq, lk, D, bs = 1, 1, 20, 36, 16, 16
    g = torch.Generator().manual_seed(4)
    q, do = [torch.randn(B, H, lq, D, generator=g) for _ in range(2)]
    k, v = [torch.randn(B, H, lk, D, generator=g) for _ in range(2)]
    kpm = torch.ones(B, lk, dtype=torch.bool)
    kpm[0, 3] = False
    lay = torch.ones(1, 2, 3, dtype=torch.bool)
    em = torch.ones(1, lq, lk, dtype=torch.bool)
    i = 5
    em[0, i] = False  # row 5: fully pruned; valid keys j <= 5 + 16 = 21, minus the padded key 3
    for backend in ("torch", "triton"):
        qs, ks, vs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = block_sparse_attention(qs, ks, vs, lay, block_size=bs, causal=True, key_padding_mask=kpm,
                                     element_mask=em, empty_rows="uniform", backend=backend)
        valid = [j for j in range(22) if j != 3]
        torch.testing.assert_close(out[0, 0, i], v[0, 0, valid].mean(0))
        dq, dk, dv = torch.autograd.grad(out, (qs, ks, vs), do)
        assert (dq[0, 0, i] == 0).all()
        # remove row i's contribution: the other rows' dv equals the 'zero' mode's dv there
        qz, kz, vz = [x.clone().requires_grad_() for x in (q, k, v)]
        oz = block_sparse_attention(qz, kz, vz, lay, block_size=bs, causal=True, key_padding_mask=kpm,
                                    element_mask=em, empty_rows="zero", backend=backend)
        assert (oz[0, 0, i] == 0).all()
        dqz, dkz, dvz = torch.autograd.grad(oz, (qz, kz, vz), do)
        extra = torch.zeros_like(v)
        extra[0, 0, valid] = do[0, 0, i] / len(valid)
        torch.testing.assert_close(dv, dvz + extra, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dq, dqz)
        torch.testing.assert_close(dk, dkz)


@needs_triton
def test_triton_causal_rectangular_matches_dense_core():
    """Full layout + causal with Lq != Lk equals the bench's eager dense core (bottom-right diagonal), also for
    the KV-cache decoding shape Lq = 1."""
    from methods.dense import eager_attention

    g = torch.Generator().manual_seed(9)
    for lq, lk in [(1, 37), (23, 50), (50, 23)]:
        q = torch.randn(2, 2, lq, 16, generator=g)
        k, v = [torch.randn(2, 2, lk, 16, generator=g) for _ in range(2)]
        lay = torch.ones(1, math.ceil(lq / 16), math.ceil(lk / 16), dtype=torch.bool)
        ref = eager_attention(q, k, v, causal=True)
        for backend in ("torch", "triton"):
            out = block_sparse_attention(q, k, v, lay, block_size=16, causal=True, backend=backend)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_sees_untracked_layout_edits():
    """The LUT cache used to be keyed on (id, _version): an edit through .data or a numpy view kept the old
    tables on the Triton path (max abs diff 0.8 at 32 tokens) while the torch path was right."""
    clear_lut_cache()
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 1, 32, 16, generator=g) for _ in range(3)]
    lay = torch.eye(2, dtype=torch.bool)[None].clone()
    block_sparse_attention(q, k, v, lay, block_size=16, backend="triton")  # fills the cache
    lay.data[0, 0, 1] = True
    a = block_sparse_attention(q, k, v, lay, block_size=16, backend="triton")
    torch.testing.assert_close(a, block_sparse_attention(q, k, v, lay, block_size=16, backend="torch"))
    lay.numpy()[0, 1, 0] = True
    b = block_sparse_attention(q, k, v, lay, block_size=16, backend="triton")
    torch.testing.assert_close(b, block_sparse_attention(q, k, v, lay, block_size=16, backend="torch"))
    with torch.inference_mode():
        lay_inf = torch.ones(1, 2, 2, dtype=torch.bool)
        c = block_sparse_attention(q, k, v, lay_inf, block_size=16, backend="triton")
    torch.testing.assert_close(c, block_sparse_attention(q, k, v, lay_inf, block_size=16, backend="torch"))


# ----------------------------------------------------------------------------------------
# 3. element masks: packing, block layouts, sparsity, fully pruned rows, FLOPs
# ----------------------------------------------------------------------------------------
def test_pack_element_mask_roundtrip_and_bytes():
    g = torch.Generator().manual_seed(2)
    for shape in [(1, 1, 1), (2, 45, 77), (3, 129, 130)]:
        m = torch.rand(*shape, generator=g) < 0.5
        pm = pack_element_mask(m)
        assert pm.bits.dtype == torch.uint8 and pm.shape == shape
        assert torch.equal(pm.unpack(), m)
        r, c = -(-shape[1] // 128) * 128, -(-shape[2] // 128) * 128
        assert pm.nbytes == shape[0] * r * c // 8  # 1 bit per entry, 128-padded
        m[0, 0, 0] = not bool(m[0, 0, 0])  # a private copy: later edits do not leak in
        assert pm.unpack()[0, 0, 0] != m[0, 0, 0]
        # bit order: bit b of byte w is key 8w + b
        one = torch.zeros(1, 1, 20, dtype=torch.bool)
        one[0, 0, 11] = True
        assert pack_element_mask(one).bits[0, 0, :2].tolist() == [0, 8]


def test_layout_from_element_mask_rules():
    g = torch.Generator().manual_seed(3)
    m = torch.rand(2, 45, 70, generator=g) < 0.02
    lay = layout_from_element_mask(m, 16)
    assert lay.shape == (2, 3, 5)
    pad = torch.zeros(2, 48, 80)
    pad[:, :45, :70] = m.float()
    assert torch.equal(lay, torch.nn.functional.max_pool2d(pad, 16) > 0)  # "any" == maxpool > 0
    assert (upsample(lay, 16, 45, 70) >= m).all()  # superset: every kept element is in a kept block
    # causal: elements above the (bottom-right) diagonal need no block
    upper = ~causal_vis(45, 70, "cpu")
    only_upper = upper[None] & (torch.rand(1, 45, 70, generator=g) < 0.5)
    assert layout_from_element_mask(only_upper, 16, causal=True).sum() == 0
    assert layout_from_element_mask(only_upper, 16).sum() > 0
    # min_fraction: a block is kept when >= that fraction of its valid entries is kept
    blk = torch.zeros(1, 32, 32, dtype=torch.bool)
    blk[0, :4, :16] = True  # 25 % of block (0, 0)
    blk[0, 16, 16] = True  # one entry of block (1, 1)
    assert layout_from_element_mask(blk, 16, min_fraction=0.25).tolist() == [[[True, False], [False, False]]]
    assert layout_from_element_mask(blk, 16, min_fraction=0.3).sum() == 0
    assert layout_from_element_mask(blk, 16).tolist() == [[[True, False], [False, True]]]


def test_mask_sparsity_by_hand():
    # lq = 4, lk = 6, causal, bs = 2: valid entries j <= i + 2 -> rows have 3, 4, 5, 6 valid keys (18 of 24)
    m = torch.zeros(1, 4, 6, dtype=torch.bool)
    m[0, 0, 0] = True  # block (0, 0)
    m[0, 3, 5] = True  # block (1, 2)
    m[0, 2, 5] = True  # above the diagonal (row 2 sees j <= 4): structural zero, ignored
    r = mask_sparsity(m, 2, causal=True)
    assert r["element_density"] == pytest.approx(2 / 18)
    assert r["grid_pruned_fraction"] == pytest.approx(1 - 2 / 24)
    # visible blocks: row block 0 (rows 0-1, last row 1 sees j <= 3): key blocks 0, 1; row block 1: 0, 1, 2 -> 5
    assert r["block_density"] == pytest.approx(2 / 5)
    # covered: block (0, 0): 4 valid entries; block (1, 2): rows 2-3 x keys 4-5, valid (2,4),(3,4),(3,5) -> 3
    assert r["covered_density"] == pytest.approx(7 / 18)
    assert r["fully_pruned_rows"] == 2 and r["rows"] == 4  # rows 1 and 2
    assert r["block_sparsity"] == pytest.approx(1 - 2 / 5)
    # coarser blocks lose sparsity
    g = torch.Generator().manual_seed(0)
    big = torch.rand(2, 128, 128, generator=g) < 0.05
    dens = [mask_sparsity(big, bs)["block_density"] for bs in (16, 32, 64)]
    assert dens[0] <= dens[1] <= dens[2] == 1.0
    assert mask_sparsity(big, 16)["element_density"] == pytest.approx(float(big.float().mean()))


def test_fully_pruned_rows_and_counts():
    em = torch.ones(2, 5, 7, dtype=torch.bool)
    em[0, 1] = False
    em[1, 3, :4] = False
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 4:] = False  # batch 1: keys 4-6 padded -> head 1 row 3 has only padded kept keys
    r = fully_pruned_rows(em, key_padding_mask=kpm)
    assert r.shape == (2, 2, 5)
    assert r[0].nonzero().tolist() == [[0, 1]]
    assert r[1].nonzero().tolist() == [[0, 1], [1, 3]]
    # causal with lq > lk: rows i < lq - lk see no key at all
    r = fully_pruned_rows(None, lq=9, lk=4, causal=True)
    assert r[0, 0].tolist() == [True] * 5 + [False] * 4


def test_block_sparse_flops():
    lay = torch.ones(2, 4, 4, dtype=torch.bool)
    assert block_sparse_flops(lay, 16, 3, 64) == 2 * 16 * 3 * 4 * 16 * 16 * 64
    assert block_sparse_flops(lay, 16, 3, 64, causal=True) == 2 * 10 * 3 * 4 * 16 * 16 * 64  # diagonal whole
    assert block_sparse_flops(lay, 16, 1, 64, part="fwd_bwd") == 3.5 * block_sparse_flops(lay, 16, 1, 64)
    one = lay[:1]
    assert block_sparse_flops(one, 16, 1, 64, n_heads=8) == 8 * block_sparse_flops(one, 16, 1, 64)
    # rectangular causal: the LUT's blocks (bottom-right diagonal), as the kernel computes them
    rect = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    lut = build_lut(rect, True, lq=40, lk=70, block_size=16)
    assert block_sparse_flops(rect, 16, 2, 32, True, 40, 70) == lut.nnz * 2 * 16 * 16 * 32 * 4
    with pytest.raises(ValueError, match="layout"):
        block_sparse_flops(rect, 16, 2, 32, True, 40, 100)
    with pytest.raises(ValueError, match="part"):
        block_sparse_flops(rect, 16, 2, 32, part="both")


# ----------------------------------------------------------------------------------------
# 4. argument checks: one-line errors naming the argument
# ----------------------------------------------------------------------------------------
def _args(lq=32, lk=48, H=2, bs=16):
    q = torch.randn(1, H, lq, 16)
    k = torch.randn(1, H, lk, 16)
    lay = torch.ones(1, math.ceil(lq / bs), math.ceil(lk / bs), dtype=torch.bool)
    return q, k, k.clone(), lay


@pytest.mark.parametrize("kw, match", [
    (dict(causal="False"), "causal: expected True or False"),
    (dict(causal=1), "causal: expected True or False"),
    (dict(causal=None), "causal"),
    (dict(block_size=16.0), "block_size: expected an int"),
    (dict(block_size=True), "block_size"),
    (dict(sm_scale=True), "sm_scale"),
    (dict(sm_scale=float("nan")), "sm_scale"),
    (dict(empty_rows="uniform_fallback"), "empty_rows"),
    (dict(softmax_mode=["renorm"]), "softmax_mode"),
    (dict(backend=None), "backend"),
    (dict(key_padding_mask=torch.ones(1, 32, dtype=torch.bool)), r"key_padding_mask: expected shape \(1, 48\)"),
    (dict(element_mask=torch.ones(2, 48, 32, dtype=torch.bool)), r"element_mask: expected shape \(2 or 1, 32, 48\)"),
    (dict(element_mask=torch.ones(3, 32, 48, dtype=torch.bool)), "element_mask"),
    (dict(element_mask=torch.ones(1, 32, 48)), "element_mask: expected a bool"),
    (dict(element_mask=torch.ones(1, 32, 48, dtype=torch.bool), softmax_mode="phantom_zero"), "softmax_mode"),
    (dict(empty_rows="uniform", softmax_mode="phantom_zero"), "empty_rows"),
])
def test_bad_arguments(kw, match):
    q, k, v, lay = _args()
    kw = {"block_size": 16, **kw}
    with pytest.raises(KernelArgumentError, match=match) as e:
        block_sparse_attention(q, k, v, lay, backend=kw.pop("backend", "torch"), **kw)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)


def test_bad_shapes():
    q, k, v, lay = _args()
    with pytest.raises(ValueError, match=r"layout: expected shape \(2, 2, 3\)"):
        block_sparse_attention(q, k, v, lay.transpose(1, 2), block_size=16)
    with pytest.raises(ValueError, match="k, v"):
        block_sparse_attention(q, k[..., :8], v, lay, block_size=16)  # D mismatch
    with pytest.raises(ValueError, match="k, v"):
        block_sparse_attention(q, k, v[:, :, :40], lay, block_size=16)  # Lk mismatch between k and v
    with pytest.raises(ValueError, match="k, v"):
        block_sparse_attention(q, k[:, :1], v[:, :1], lay, block_size=16)  # H mismatch
    pm = pack_element_mask(torch.ones(1, 32, 48, dtype=torch.bool), device="meta")
    with pytest.raises(ValueError, match="element_mask: packed on meta"):
        block_sparse_attention(q, k, v, lay, block_size=16, element_mask=pm)


def test_attention_stats_argument_checks():
    q = torch.randn(0, 2, 16, 16)
    with pytest.raises(KernelArgumentError, match="q: expected B, H, L >= 1"):
        attention_stats(q, q, backend="torch")
    with pytest.raises(KernelArgumentError, match="q"):
        kernels.AttentionStatsAccumulator(backend="torch").update(q, q)
    q = torch.randn(2, 2, 16, 16)
    with pytest.raises(KernelArgumentError, match="causal"):
        attention_stats(q, q, causal="False", backend="torch")
    with pytest.raises(KernelArgumentError, match="block_size"):
        attention_stats(q, q, block_size=16.0, backend="torch")
    with pytest.raises(KernelArgumentError, match="block_size"):
        attention_stats(q, q, block_size=True, backend="torch")
    with pytest.raises(KernelArgumentError, match="per_head"):
        attention_stats(q, q, per_head="no", backend="torch")
    with pytest.raises(KernelArgumentError, match="sm_scale"):
        attention_stats(q, q, sm_scale="0.1", backend="torch")
    with pytest.raises(KernelArgumentError, match="causal"):
        kernels.AttentionStatsAccumulator(causal="yes")

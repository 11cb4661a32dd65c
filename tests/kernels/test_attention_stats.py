"""Tests for kernels.attention_stats (CPU: Triton kernels under TRITON_INTERPRET=1)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from kernels import AttentionStatsAccumulator, attention_stats  # noqa: E402
from kernels.block_sparse_attention import HAS_TRITON  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = HAS_TRITON and (DEV == "cuda" or importlib.import_module("kernels.block_sparse_attention")._INTERPRET)
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])


def dense_probs(q, k, kpm=None, causal=False):
    """Explicit (B, H, L, L) fp64 softmax with masked keys at probability 0 (empty rows -> 0)."""
    B, H, L, D = q.shape
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    valid = torch.ones(B, 1, L, L, dtype=torch.bool, device=q.device)
    if kpm is not None:
        valid = valid & kpm[:, None, None, :]
    if causal:
        valid = valid & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p


def pool_real(p, bs):
    """(X, L, L) -> (X, nb, nb) block means over the real region (partial blocks: real count)."""
    X, L, _ = p.shape
    nb = math.ceil(L / bs)
    pad = torch.zeros(X, nb * bs, nb * bs, dtype=p.dtype, device=p.device)
    pad[:, :L, :L] = p
    cnt = torch.zeros(nb * bs, nb * bs, dtype=p.dtype, device=p.device)
    cnt[:L, :L] = 1
    return pad.view(X, nb, bs, nb, bs).sum((2, 4)) / cnt.view(nb, bs, nb, bs).sum((1, 3))


def expected(q, k, kpm, causal, block_size, per_head):
    p = dense_probs(q, k, kpm, causal).mean(0)  # (H, L, L)
    if not per_head:
        p = p.mean(0, keepdim=True)
    if block_size is not None:
        p = pool_real(p, block_size)
    return p if per_head else p[0]


def _inputs(seed, B, H, L, D, pad, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = [torch.randn(B, H, L, D, generator=g).to(dtype).to(DEV) for _ in range(2)]
    kpm = None
    if pad:
        kpm = torch.rand(B, L, generator=g) > 0.3
        kpm[0, L // 2:] = False
        if B > 2:
            kpm[2] = False  # an all-padding sequence: its rows are all 0
        kpm = kpm.to(DEV)
    return q, k, kpm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 16, 32, 5])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("causal,pad", [(False, False), (True, True), (False, True)])
def test_stats_vs_dense(backend, block_size, per_head, causal, pad):
    L = 45 if block_size != 32 else 64  # odd L -> partial last block
    q, k, kpm = _inputs(hash((block_size, per_head, causal, pad)) % 1000, 3, 2, L, 16, pad)
    got = attention_stats(q, k, key_padding_mask=kpm, causal=causal, block_size=block_size, per_head=per_head,
                          backend=backend)
    exp = expected(q, k, kpm, causal, block_size, per_head)
    assert got.dtype == torch.float32 and got.shape == exp.shape
    torch.testing.assert_close(got.double(), exp, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sum_to_one(backend):
    q, k, kpm = _inputs(3, 2, 2, 40, 32, True)
    p = attention_stats(q, k, key_padding_mask=kpm, backend=backend)  # (H, L, L), batch mean
    # every sequence has at least one real key -> each row of the batch mean sums to 1
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 40, device=DEV), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_half_precision(backend, dtype):
    q, k, kpm = _inputs(4, 2, 2, 33, 16, True, dtype)
    got = attention_stats(q, k, key_padding_mask=kpm, block_size=16, backend=backend)
    exp = expected(q, k, kpm, False, 16, True)  # fp64 from the same (rounded) inputs
    torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size,per_head", [(None, True), (16, False), (16, True)])
def test_accumulator_three_batches(backend, block_size, per_head):
    acc = AttentionStatsAccumulator(block_size=block_size, per_head=per_head, causal=False, backend=backend)
    all_p = []
    for i, B in enumerate([1, 3, 2]):
        q, k, kpm = _inputs(10 + i, B, 2, 36, 16, True)
        acc.update(q, k, key_padding_mask=kpm)
        all_p.append(dense_probs(q, k, kpm))
    assert acc.count == 6
    p = torch.cat(all_p).mean(0)
    if not per_head:
        p = p.mean(0, keepdim=True)
    if block_size is not None:
        p = pool_real(p, block_size)
    if not per_head:
        p = p[0]
    torch.testing.assert_close(acc.mean().double(), p, atol=2e-6, rtol=1e-5)


def test_out_argument_and_errors():
    q, k, kpm = _inputs(1, 2, 2, 32, 16, False)
    out = torch.full((2, 2, 2), float("nan"), device=DEV)
    r = attention_stats(q, k, block_size=16, out=out, backend="torch")
    assert r is out and not torch.isnan(out).any()
    with pytest.raises(ValueError, match="out"):
        attention_stats(q, k, block_size=16, out=torch.zeros(3, 3, device=DEV))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_stats(q, k, key_padding_mask=torch.ones(2, 31, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_stats(q, k, key_padding_mask=torch.ones(2, 32, device=DEV))
    with pytest.raises(ValueError, match="k"):
        attention_stats(q, k[:, :1])
    with pytest.raises(ValueError, match="backend"):
        attention_stats(q, k, backend="gpu")
    with pytest.raises(ValueError, match="block_size"):
        attention_stats(q, k, block_size=0)
    acc = AttentionStatsAccumulator()
    with pytest.raises(ValueError, match="no batches"):
        acc.mean()


def test_torch_reference_is_chunked():
    """L = 1024, B*H*L*L would be 8M floats; the reference works chunk by chunk and matches."""
    q, k, _ = _inputs(2, 2, 2, 300, 16, False)
    got = attention_stats(q, k, block_size=64, per_head=False, backend="torch")
    torch.testing.assert_close(got.double(), expected(q, k, None, False, 64, False), atol=1e-6, rtol=1e-5)

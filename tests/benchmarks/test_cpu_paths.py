"""CPU-path timings at small sizes, with exact work counters (see conftest.py for the regression gate: each
benchmark is judged as a ratio to the calibration workload named here, timed beside it in every round)."""
import torch

from kernels import attention_stats, block_sparse_attention, build_lut, random_layout
from bench.attention import eager_attention

B, H, L, D, BS, DENSITY = 2, 4, 512, 32, 32, 0.25


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g, requires_grad=requires_grad) for _ in range(3)]


def _layout():
    return random_layout(H, L // BS, DENSITY, generator=torch.Generator().manual_seed(1))


def _flops(layout):  # fwd FLOPs on kept blocks: QK^T and PV, 2 flops per MAC each
    return int(layout.sum()) * BS * BS * D * 4 * B


def test_block_sparse_reference_fwd(benchmark, gate):
    q, k, v = _inputs()
    layout = _layout()
    out = gate(lambda: block_sparse_attention(q, k, v, layout, block_size=BS, backend="torch"), "tensor-v1")
    benchmark.extra_info.update(kept_blocks=int(layout.sum()), fwd_flops=_flops(layout))
    assert int(layout.sum()) == H * round(DENSITY * (L // BS) ** 2)
    assert _flops(layout) == H * 64 * BS * BS * D * 4 * B
    assert out.shape == q.shape


def test_block_sparse_reference_fwd_bwd(benchmark, gate):
    q, k, v = _inputs(requires_grad=True)
    layout = _layout()

    def step():
        block_sparse_attention(q, k, v, layout, block_size=BS, backend="torch").sum().backward()

    gate(step, "tensor-v1")
    benchmark.extra_info.update(fwd_bwd_flops=int(3.5 * _flops(layout)))
    assert q.grad is not None


def test_eager_dense_fwd(benchmark, gate):
    q, k, v = _inputs()
    gate(lambda: eager_attention(q, k, v), "tensor-v1")
    flops = 4 * B * H * L * L * D
    benchmark.extra_info.update(fwd_flops=flops)
    assert flops == 4 * 2 * 4 * 512 * 512 * 32


def test_attention_stats_pooled(benchmark, gate):
    q, k, _ = _inputs()
    out = gate(lambda: attention_stats(q, k, block_size=BS, backend="torch"), "tensor-v1")
    assert out.shape == (H, L // BS, L // BS)
    # each query row of P sums to 1, so a block row of block means sums to BS / BS**2
    torch.testing.assert_close(out.sum(-1), torch.full((H, L // BS), 1.0 / BS))


def test_lut_build(benchmark, gate):
    layout = random_layout(8, 128, 0.1, generator=torch.Generator().manual_seed(2))
    lut = gate(lambda: build_lut(layout), "small-ops-v1")
    nnz = int(layout.sum())
    benchmark.extra_info.update(nnz_blocks=nnz)
    assert nnz == 8 * round(0.1 * 128 * 128) == lut.nnz

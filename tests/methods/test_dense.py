"""The dense baselines agree with the float64 textbook softmax, incl. padding and KV-cache causal shapes."""
import pytest
import torch

from bench.attention import eager_attention
from bench.method import AttentionSpec, MethodContext
from methods.dense import Dense, Eager, Flex, FlexCore, SDPAConfig


def _ref(q, k, v, kpm, causal):
    return eager_attention(q.double(), k.double(), v.double(), kpm, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq, Lk", [(37, 37), (1, 37), (5, 37)])
@pytest.mark.parametrize("padding", [False, True])
def test_sdpa_and_flex_match_reference(causal, Lq, Lk, padding):
    g = torch.Generator().manual_seed(Lq * 7 + Lk + causal)
    q = torch.randn(2, 2, Lq, 16, generator=g)
    k, v = (torch.randn(2, 2, Lk, 16, generator=g) for _ in range(2))
    kpm = (torch.rand(2, Lk, generator=g) > 0.3) if padding else None
    if kpm is not None:
        kpm[:, -1] = True  # causal rows must see at least one key for the comparison to be meaningful
    spec = AttentionSpec(layer=0, n_heads=2, head_dim=16, max_len=Lk, causal=causal)
    ref = _ref(q, k, v, kpm, causal).float()
    for core in (Dense(SDPAConfig("math")).make_attention(spec), Dense(SDPAConfig()).make_attention(spec),
                 Eager(None).make_attention(spec)):
        torch.testing.assert_close(core(q, k, v, kpm), ref, atol=1e-5, rtol=1e-4)
    out = FlexCore(spec, "off")(q, k, v, kpm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_eager_fully_masked_row_is_zero_not_nan():
    q = k = v = torch.randn(1, 1, 4, 8)
    kpm = torch.tensor([[False, False, False, False]])
    assert torch.equal(eager_attention(q, k, v, kpm), torch.zeros_like(q))


def test_flex_builds_one_block_mask_per_batch_not_per_layer(monkeypatch):
    from torch.nn.attention import flex_attention as fa

    built = []
    real = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **kw: built.append(1) or real(*a, **kw))
    spec = AttentionSpec(layer=0, n_heads=2, head_dim=16, max_len=32)
    layers = [FlexCore(spec, "off") for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    q = k = v = torch.randn(2, 2, 32, 16, generator=g)
    for batch in range(2):
        kpm = torch.ones(2, 32, dtype=torch.bool)
        kpm[1, 20 + batch:] = False  # a new mask tensor per batch, shared by every layer
        ref = _ref(q, k, v, kpm, False).float()
        for core in layers:
            torch.testing.assert_close(core(q, k, v, kpm), ref, atol=1e-5, rtol=1e-4)
    assert len(built) == 2  # once per batch


def test_has_padding_asks_once_per_mask_and_sees_in_place_edits():
    from bench.attention import has_padding

    kpm = torch.ones(2, 8, dtype=torch.bool)
    assert not has_padding(kpm) and not has_padding(kpm) and not has_padding(None)
    kpm[0, 5:] = False  # same tensor, edited in place: a new answer
    assert has_padding(kpm)
    assert not has_padding(torch.ones(2, 8, dtype=torch.bool))  # a new tensor


def test_dense_family_and_defaults():
    ctx = MethodContext(task="lra_listops", suite="lra", scale="tiny")
    for cls in (Dense, Flex, Eager):
        assert cls.family == "dense"
        assert cls.default_config(ctx) == cls.Config()


def test_primitives_live_in_bench_attention():
    import bench.attention as A
    import methods.dense as D

    assert D.eager_attention is A.eager_attention and D.masked_sdpa is A.masked_sdpa  # re-exported, not copied
    assert D.FlexCore._block_masks.__class__ is A.PerMask

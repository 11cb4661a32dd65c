"""Encoder-decoder backbone: attention specs, KV-cache decoding == full recompute, beam 1 == greedy."""
import pytest
import torch

from bench.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, label_smoothed_nll, sinusoidal_positions
from bench.method import NoConfig
from methods.dense import Dense, Eager, SDPAConfig

CFG = Seq2SeqConfig(n_enc_layers=2, n_dec_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0, max_src_len=16, max_tgt_len=16)
V = 23


def _model(method=None, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    method = method or Eager(NoConfig())
    return Seq2SeqTransformer(cfg, method, vocab_size=V).eval(), method


def _src(B=3, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, L), generator=g)
    lengths = torch.tensor([L, L - 3, 2])[:B]
    mask = torch.arange(L)[None] < lengths[:, None]
    return src.masked_fill(~mask, 0), mask


def test_attention_specs_cover_three_kinds():
    model, method = _model()
    specs = [c.spec for c in method.cores]
    assert len(specs) == 2 + 2 * 2
    enc = [s for s in specs if s.stack == "encoder"]
    assert all(s.kind == "self" and not s.causal and s.max_len == 16 for s in enc)
    dec_self = [s for s in specs if s.kind == "decoder_self"]
    assert [s.layer for s in dec_self] == [0, 1] and all(s.causal and s.stack == "decoder" for s in dec_self)
    cross = [s for s in specs if s.kind == "cross"]
    assert [s.layer for s in cross] == [0, 1] and all(not s.causal and s.stack == "decoder" for s in cross)
    assert all(s.head_dim == 8 and s.n_heads == 4 for s in specs)


def test_tied_embeddings_and_padding():
    model, _ = _model()
    assert model.tgt_emb is model.src_emb and model.out_proj is None
    src, mask = _src()
    tgt = torch.randint(4, V, (3, 5))
    logits = model(src, mask, tgt)
    assert logits.shape == (3, 5, V) and torch.isfinite(logits).all()
    # padding positions of the source do not change the output
    src2 = src.masked_fill(~mask, 7)
    assert torch.allclose(model(src2, mask, tgt), logits, atol=1e-5)


def _cached_logits(model, src, mask, tgt):
    memory, mmask = model.encode(src, mask)
    caches = model.init_cache(memory)
    return torch.stack([model.decode_step(tgt[:, t], caches, mmask, t) for t in range(tgt.shape[1])], 1)


def _method(name):
    from methods.dense import Flex, FlexConfig

    return {"eager": lambda: Eager(NoConfig()), "dense": lambda: Dense(SDPAConfig()),
            "flex": lambda: Flex(FlexConfig(compile="off"))}[name]()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("method", ["eager", "dense", "flex"])
def test_kv_cache_matches_full_recompute(method):
    """Cached decoding calls causal cores with Lq=1 < Lk: they must align the causal diagonal bottom-right."""
    model, _ = _model(_method(method))
    src, mask = _src()
    tgt = torch.randint(4, V, (3, 7))
    tgt[:, 0] = model.bos_id
    with torch.no_grad():  # FlexAttention has no CPU backward
        full = model(src, mask, tgt)
        inc = _cached_logits(model, src, mask, tgt)
    assert torch.allclose(full, inc, atol=1e-5), (full - inc).abs().max()


def test_greedy_matches_argmax_of_full_recompute():
    model, _ = _model(seed=3)
    src, mask = _src()
    out = model.greedy(src, mask, max_len=8)
    for b, seq in enumerate(out):
        tgt = torch.tensor([[model.bos_id] + seq])
        logits = model(src[b : b + 1, : int(mask[b].sum())], mask[b : b + 1, : int(mask[b].sum())], tgt)[0]
        pred = logits.argmax(-1).tolist()
        assert pred[: len(seq)] == seq  # each emitted token is the argmax given its prefix
        if len(seq) < 7:
            assert pred[len(seq)] == model.eos_id


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_equals_greedy(seed):
    model, _ = _model(seed=seed)
    src, mask = _src(seed=seed)
    assert model.beam_search(src, mask, beam_size=1, max_len=10) == model.greedy(src, mask, max_len=10)
    assert model.beam_search(src, mask, beam_size=1, max_len=10, min_len=3) == model.greedy(src, mask, max_len=10, min_len=3)


def test_beam_search_scores_at_least_greedy():
    model, _ = _model(seed=5)
    src, mask = _src()

    def score(b, seq):  # sum log p of seq + EOS, length-normalised like beam_search (length_penalty=1)
        n = int(mask[b].sum())
        tgt = torch.tensor([[model.bos_id] + seq])
        logp = torch.log_softmax(model(src[b : b + 1, :n], mask[b : b + 1, :n], tgt)[0].float(), -1)
        ys = seq + [model.eos_id]
        return sum(logp[i, y].item() for i, y in enumerate(ys)) / len(ys)

    greedy = model.greedy(src, mask, max_len=12)
    beam = model.beam_search(src, mask, beam_size=4, max_len=12)
    for b in range(3):
        if len(greedy[b]) < 11 and len(beam[b]) < 11:
            assert score(b, beam[b]) >= score(b, greedy[b]) - 1e-4


def test_beam_search_batch_independent():
    model, _ = _model(seed=2)
    src, mask = _src()
    batch = model.beam_search(src, mask, beam_size=3, max_len=10)
    for b in range(3):
        n = int(mask[b].sum())
        assert model.beam_search(src[b : b + 1, :n], mask[b : b + 1, :n], beam_size=3, max_len=10)[0] == batch[b]


def test_encoder_pooler_hook_shortens_memory():
    class Halve(torch.nn.Module):
        def output_length(self, length):
            return (length + 1) // 2

        def forward(self, x, mask):
            return x[:, ::2], mask[:, ::2]

    class PoolingEager(Eager):
        def make_pooler(self, spec):
            return Halve() if spec.layer == 0 else None

    model, method = _model(PoolingEager(NoConfig()))
    src, mask = _src(L=10)
    memory, mmask = model.encode(src, mask)
    assert memory.shape[1] == 5 and mmask.shape == (3, 5)
    cross = [c.spec for c in method.cores if c.spec.kind == "cross"]
    assert all((s.lq, s.lk) == (16, 8) for s in cross)  # max_tgt_len queries, pooled max_src_len keys
    tgt = torch.randint(4, V, (3, 4))
    assert torch.allclose(model(src, mask, tgt), _cached_logits(model, src, mask, tgt), atol=1e-5)


def test_label_smoothing_loss():
    logits = torch.randn(2, 3, V)
    target = torch.tensor([[5, 6, 0], [7, 0, 0]])
    plain = torch.nn.functional.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=0)
    assert torch.allclose(label_smoothed_nll(logits, target, 0.0), plain, atol=1e-6)
    smoothed = torch.nn.functional.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=0, label_smoothing=0.1)
    assert torch.allclose(label_smoothed_nll(logits, target, 0.1), smoothed, atol=1e-5)


def test_sinusoidal_offset():
    pe = sinusoidal_positions(10, 8)
    assert torch.allclose(sinusoidal_positions(3, 8, offset=4), pe[4:7])

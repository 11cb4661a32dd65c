"""Cost accounting (bench/cost.py): exact Linear and attention counts, overridden core counts, causal triangles,
the last_cost() protocol (MoE FFNs), parameters, and all four backbones; the quality-vs-cost figure
(bench/cost_figure.py) from synthetic run records."""
import math

import pytest
import torch
from torch import nn

from bench.cost import COST_KEYS, causal_pairs, count_params, dense_pairs_flops, forward_cost
from bench.cost_figure import points_from_records, quality_vs_cost_figure, quality_vs_cost_figures, record_cost
from bench.method import AttentionCore, AttentionSpec, NoConfig
from bench.models.layers import MultiHeadAttention
from methods.dense import Eager, EagerCore


class NoMethod:
    cores, ffns = [], []


def test_linear_counts_exact_per_row():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 5, 4)  # 10 rows
    c = forward_cost(model, NoMethod(), lambda: model(x), n_tokens=10)
    assert c["forward_flops"] == 2 * 4 * 8 * 10 + 2 * 8 * 3 * 10
    assert c["linear_flops_per_token"] == c["flops_per_token"] == (2 * 4 * 8 + 2 * 8 * 3)
    assert c["attention_flops_per_token"] == 0 and c["attention_density_by_layer"] == []
    assert c["ffn_executed_fraction"] == 1.0
    assert c["params"] == c["trainable_params"] == 4 * 8 + 8 + 8 * 3 + 3 and c["embedding_params"] == 0
    # called twice -> counted twice; hooks are removed afterwards
    c2 = forward_cost(model, NoMethod(), lambda: (model(x), model(x)), n_tokens=10)
    assert c2["forward_flops"] == 2 * c["forward_flops"]
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError):
        forward_cost(model, NoMethod(), lambda: model(x), n_tokens=0)


class Fixed(AttentionCore):
    """A 'sparse' core whose kernel computes 1000 FLOPs per call, and has no density()."""

    def forward(self, q, k, v, key_padding_mask=None):
        return v

    def flops(self, q, k, key_padding_mask=None):
        return 1000.0


class WithDensity(Fixed):
    def density(self):
        return 0.25


class FixedMethod(Eager):
    family = "learned_pattern"

    def __init__(self, core_cls):
        super().__init__(NoConfig())
        self.core_cls = core_cls

    def make_attention(self, spec):
        return self.core_cls(spec)


@pytest.mark.parametrize("core_cls", [Fixed, WithDensity])
def test_overridden_core_flops_used(core_cls):
    m = FixedMethod(core_cls)
    mha = MultiHeadAttention(8, 2, m, AttentionSpec(layer=0, n_heads=2, head_dim=4, max_len=6))
    x = torch.randn(3, 6, 8)
    c = forward_cost(mha, m, lambda: mha(x), n_tokens=18)
    assert c["attention_flops_per_token"] == 1000.0 / 18
    assert c["linear_flops_per_token"] == 4 * 2 * 8 * 8  # q, k, v, out on every row
    dense = dense_pairs_flops(3, 2, 6, 6, 4)
    want = 0.25 if core_cls is WithDensity else 1000.0 / dense
    assert c["attention_density_by_layer"] == [pytest.approx(want)] and c["attention_count_by_layer"] == ["core"]


def test_causal_dense_core_counts_lower_triangle():
    m = Eager(NoConfig())
    mha = MultiHeadAttention(8, 2, m, AttentionSpec(layer=0, n_heads=2, head_dim=4, max_len=6, causal=True))
    x = torch.randn(3, 6, 8)
    c = forward_cost(mha, m, lambda: mha(x), n_tokens=18)
    assert c["attention_flops_per_token"] * 18 == 4 * 3 * 2 * 21 * 4  # 21 = 6*7/2 pairs
    assert c["attention_density_by_layer"] == [1.0]  # dense relative to what causality allows
    assert c["attention_count_by_layer"] == ["all_pairs"]
    # non-causal: full square
    m2 = Eager(NoConfig())
    mha2 = MultiHeadAttention(8, 2, m2, AttentionSpec(layer=0, n_heads=2, head_dim=4, max_len=6))
    assert forward_cost(mha2, m2, lambda: mha2(x), 18)["attention_flops_per_token"] * 18 == 4 * 3 * 2 * 36 * 4


@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 7), (5, 5), (3, 8), (8, 3), (6, 1), (16, 16)])
def test_closed_form_causal_pairs_match_core_count(lq, lk):
    core = EagerCore(AttentionSpec(layer=0, n_heads=1, head_dim=1, max_len=lq, causal=True))
    q, k = torch.zeros(1, 1, lq, 1), torch.zeros(1, 1, lk, 1)
    assert dense_pairs_flops(1, 1, lq, lk, 1, causal=True) == core.flops(q, k)
    brute = sum(int(((torch.arange(lk) <= i + lk - lq)).sum()) for i in range(lq)) if lq > 1 else lq * lk
    assert causal_pairs(lq, lk) == brute


# ---- the last_cost() protocol ---------------------------------------------------------------------------------
class HalfFFN(nn.Module):
    """An 'MoE' FFN that executes half of its hidden units and says so."""

    def __init__(self, default):
        super().__init__()
        self.inner = default

    def forward(self, x):
        self._rows = x.numel() // x.shape[-1]
        return self.inner(x)

    def last_cost(self):
        f = self.inner
        dense = 2.0 * self._rows * (f.fc1.in_features * f.fc1.out_features + f.fc2.in_features * f.fc2.out_features)
        return {"flops": dense / 2, "executed_fraction": 0.5}


class MoEMethod(Eager):
    def __init__(self, layers=None):
        super().__init__(NoConfig())
        self.layers = layers

    def make_ffn(self, spec, default):
        return HalfFFN(default) if self.layers is None or spec.layer in self.layers else default


def _lra(method, L=16, dual=False, n_layers=2):
    from bench.models.lra_encoder import LRAEncoder, LRAModelConfig

    torch.manual_seed(0)
    cfg = LRAModelConfig(vocab_size=20, n_classes=3, max_len=L, n_layers=n_layers, d_model=16, d_qkv=16, n_heads=2,
                         d_ff=32, dropout=0.0, dual=dual)
    return LRAEncoder(cfg, method).eval()


def _lra_in(B=2, L=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 20, (B, L), generator=g), torch.ones(B, L, dtype=torch.bool)


def test_ffn_last_cost_protocol_replaces_linear_children():
    tok, mask = _lra_in()
    dense_m = Eager(NoConfig())
    idle = forward_cost(_lra(dense_m), dense_m, lambda: None, 32)  # nothing ran: nothing counted, cores unknown
    assert idle["forward_flops"] == 0 and idle["attention_density_by_layer"] == [None, None]
    base_m = Eager(NoConfig())
    base_model = _lra(base_m)
    base = forward_cost(base_model, base_m, lambda: base_model(tok, mask), 32)
    ffn_flops = 2 * 2 * 32 * (16 * 32 * 2)  # 2 layers x 2 (FLOPs/MAC) x rows x (fc1 + fc2)
    for layers, frac in ((None, 0.5), ({0}, 0.75)):
        m = MoEMethod(layers)
        model = _lra(m)
        c = forward_cost(model, m, lambda: model(tok, mask), 32)
        n_half = 2 if layers is None else 1
        assert c["ffn_executed_fraction"] == frac
        assert c["reported_flops_per_token"] * 32 == n_half * ffn_flops / 2 / 2
        assert c["linear_flops_per_token"] * 32 == base["linear_flops_per_token"] * 32 - n_half * ffn_flops / 2
        assert c["flops_per_token"] == pytest.approx(base["flops_per_token"] - n_half * ffn_flops / 4 / 32)
    # a module called twice per forward (Retrieval: shared encoder) reports twice
    m = MoEMethod()
    model = _lra(m, dual=True)
    c = forward_cost(model, m, lambda: model(tok, mask, tok, mask), 64)
    assert c["reported_flops_per_token"] * 64 == 2 * ffn_flops / 2 and c["ffn_executed_fraction"] == 0.5


# ---- the four backbones ---------------------------------------------------------------------------------------
def _gpt(method, L):
    from bench.models.decoder import DecoderConfig, GPTDecoder

    torch.manual_seed(0)
    return GPTDecoder(DecoderConfig(vocab_size=30, max_len=L, n_layers=2, d_model=16, n_heads=2, d_ff=32,
                                    dropout=0.0), method).eval()


def test_gpt_decoder_exact_counts_and_tied_params():
    d, dff, V, H, D, nl, B = 16, 32, 30, 2, 8, 2, 2
    per_token = {}
    for L in (8, 16):
        m = Eager(NoConfig())
        model = _gpt(m, L)
        tok = torch.randint(0, V, (B, L))
        c = forward_cost(model, m, lambda: model(tok), B * L)
        lin = nl * 2 * (4 * d * d + 2 * d * dff) + 2 * d * V  # tied LM head is a Linear: counted
        assert c["linear_flops_per_token"] == lin
        assert c["attention_flops_per_token"] * B * L == nl * 4 * B * H * D * L * (L + 1) // 2
        assert c["attention_density_by_layer"] == [1.0, 1.0]
        per_token[L] = c["attention_flops_per_token"]
        assert c["embedding_params"] == V * d + L * d
        assert c["params"] == sum(p.numel() for p in model.parameters())  # tied weight once
    assert per_token[16] / per_token[8] == pytest.approx(17 / 9)  # causal: (L + 1) / 2 pairs per query


def test_lra_attention_scales_linearly_per_token():
    got = {}
    for L in (16, 32):
        m = Eager(NoConfig())
        model = _lra(m, L=L)
        tok, mask = _lra_in(L=L)
        got[L] = forward_cost(model, m, lambda: model(tok, mask), 2 * L)
    a, b = got[16], got[32]
    assert b["attention_flops_per_token"] == 2 * a["attention_flops_per_token"]  # all pairs: L per query
    # Linears: same per token except the head (once per sequence)
    head = 2 * (16 * 16 + 16 * 3) * 2
    assert b["linear_flops_per_token"] * 64 - head == 2 * (a["linear_flops_per_token"] * 32 - head)
    assert all(math.isfinite(v) and v > 0 for v in (a["flops_per_token"], b["flops_per_token"]))


def test_seq2seq_counts_tied_output_projection_and_cross_attention():
    from bench.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

    m = Eager(NoConfig())
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(n_enc_layers=2, n_dec_layers=2, d_model=16, n_heads=2, d_ff=32, dropout=0.0,
                        max_src_len=16, max_tgt_len=10)
    model = Seq2SeqTransformer(cfg, m, vocab_size=20).eval()
    B, Ls, Lt, d, dff, V = 3, 12, 6, 16, 32, 20
    src, mask = torch.randint(3, 20, (B, Ls)), torch.ones(B, Ls, dtype=torch.bool)
    tgt = torch.randint(3, 20, (B, Lt))
    c = forward_cost(model, m, lambda: model(src, mask, tgt), B * (Ls + Lt))
    block = 2 * (4 * d * d + 2 * d * dff)
    cross = 2 * (B * Lt * 2 * 2 * d * d + B * Ls * 2 * 2 * d * d)  # q, out on target rows; k, v on memory rows
    lin = B * Ls * 2 * block + B * Lt * 2 * block + cross + B * Lt * 2 * d * V  # + tied output projection
    assert c["linear_flops_per_token"] * B * (Ls + Lt) == lin
    H, D = 2, 8
    attn = 2 * 4 * B * H * D * Ls * Ls + 2 * 4 * B * H * D * Lt * (Lt + 1) // 2 + 2 * 4 * B * H * D * Lt * Ls
    assert c["attention_flops_per_token"] * B * (Ls + Lt) == attn
    assert len(c["attention_density_by_layer"]) == 6 and c["attention_density_by_layer"] == [1.0] * 6


def test_hf_bert_finite_and_exact_linears():
    from bench.models.hf_bert import BertScratchConfig, install_method_hooks, load_bert_encoder

    torch.manual_seed(0)
    enc = load_bert_encoder("", BertScratchConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, max_len=32),
                            vocab_size=40).eval()
    m = Eager(NoConfig())
    enc = install_method_hooks(enc, m, max_len=32)
    got = {}
    for L in (8, 16):
        ids, am = torch.randint(1, 40, (2, L)), torch.ones(2, L, dtype=torch.long)
        c = forward_cost(enc, m, lambda: enc(input_ids=ids, attention_mask=am), 2 * L)
        assert c["linear_flops_per_token"] == 2 * 2 * (4 * 16 * 16 + 2 * 16 * 32)  # fc2 (ex output.dense) once
        assert all(math.isfinite(v) and v > 0 for v in (c["flops_per_token"], c["attention_flops_per_token"]))
        assert c["embedding_params"] > 0 and c["params"] > c["embedding_params"]
        got[L] = c["attention_flops_per_token"]
    assert got[16] == 2 * got[8]


def test_count_params_trainable_and_json():
    import json

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)
    assert count_params(model) == {"params": 40 + 20, "trainable_params": 20, "embedding_params": 40}
    m = Eager(NoConfig())
    mha = MultiHeadAttention(8, 2, m, AttentionSpec(layer=0, n_heads=2, head_dim=4, max_len=6))
    c = forward_cost(mha, m, lambda: mha(torch.randn(1, 6, 8)), 6)
    assert json.loads(json.dumps(c)) == c and set(c) == set(COST_KEYS)


# ---- quality-vs-cost figure ----------------------------------------------------------------------------------

def rec(method, seed, acc, *, family="dense", cost=None, stages=None, ops=None, variant=None, task="lra_listops"):
    r = dict(kind="run", task=task, method=method, scale="tiny", seed=seed,
             metrics={"accuracy": acc, "dev_accuracy": acc + 1}, higher_is_better={"accuracy": True},
             budget={"main_metric": "accuracy"},
             method_info={"family": family, **({"variant": variant} if variant else {})})
    if cost is not None:
        r["cost"] = {"flops_per_token": cost}
    if stages is not None:
        r["stages"] = stages
    if ops is not None:
        r["operating_points"] = ops
    return r


def op(tau, acc, cost, key="test_accuracy"):
    return {"point": {"tau": tau}, "metrics": {key: acc}, "cost": {"flops_per_token": cost}}


RECORDS = [
    rec("dense", 0, 40.0, cost=2e6), rec("dense", 1, 42.0, cost=2e6),
    rec("dense", 0, 39.0, cost=2e6, variant="backend=flash"),
    rec("spion", 0, 38.0, family="learned_pattern",
        stages=[{"name": "dense", "cost": {"flops_per_token": 2e6}},
                {"name": "sparse", "cost": {"flops_per_token": 1e6}}, {"name": "eval_only"}]),
    rec("ap", 0, 41.0, family="learned_pattern", cost=1.5e6, ops=[op(0.9, 39.0, 8e5), op(0.5, 41.0, 1.2e6)]),
    rec("ap", 1, 43.0, family="learned_pattern", cost=1.5e6, ops=[op(0.9, 41.0, 8e5), op(0.5, 43.0, 1.2e6),
                                                                   {"point": {"tau": 0.1}, "metrics": {}}]),
    rec("local", 0, 30.0, family="fixed_pattern"),  # no cost anywhere
]


def test_points_grouped_and_seeds_averaged():
    points, notes = points_from_records(RECORDS)
    by = {(p["method"], p["kind"], str(p["point"])): p for p in points}
    d = by[("dense", "run", "None")]
    assert d["metric"] == 41.0 and d["metric_std"] == pytest.approx(2 ** 0.5) and d["seeds"] == 2
    assert by[("dense [backend=flash]", "run", "None")]["seeds"] == 1
    assert by[("dense [backend=flash]", "run", "None")]["metric_std"] is None
    assert by[("spion", "run", "None")]["flops_per_token"] == 1e6  # the last stage with a cost
    ap_ops = sorted((p for p in points if p["method"] == "ap" and p["kind"] == "operating_point"),
                    key=lambda p: p["flops_per_token"])
    assert [(p["point"], p["metric"], p["seeds"]) for p in ap_ops] == [({"tau": 0.9}, 40.0, 2), ({"tau": 0.5}, 42.0, 2)]
    assert by[("ap", "run", "None")]["family"] == "learned_pattern"
    assert not any(p["method"] == "local" for p in points)
    assert any("local" in n and "no cost" in n for n in notes)
    assert any('{"tau": 0.1}' in n for n in notes)
    assert record_cost(RECORDS[-1]) is None and record_cost(RECORDS[0]) == {"flops_per_token": 2e6}


def test_operating_point_metric_fallbacks_are_noted():
    r = rec("sea", 0, 30.0, family="estimated", cost=1e6, ops=[op(4, 29.0, 5e5, key="dev_accuracy"),
                                                                op(8, 31.0, 7e5, key="accuracy")])
    points, notes = points_from_records([r])
    assert sorted(p["metric"] for p in points if p["kind"] == "operating_point") == [29.0, 31.0]
    assert any("dev_accuracy" in n for n in notes)


def test_figure_written(tmp_path):
    points, _ = points_from_records(RECORDS)
    path = quality_vs_cost_figure(points, tmp_path / "sub" / "fig.png", "ListOps", "accuracy", True)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    empty = quality_vs_cost_figure([], tmp_path / "empty.png", "nothing", "accuracy", False)
    assert empty.exists()


def test_figures_per_task(tmp_path):
    recs = RECORDS + [rec("dense", 0, 70.0, cost=3e6, task="lra_text")]
    paths, notes = quality_vs_cost_figures(recs, tmp_path)
    assert set(paths) == {"lra_listops", "lra_text"} and all(p.exists() for p in paths.values())
    assert paths["lra_text"].name == "quality_vs_cost_lra_text.png" and notes

"""Attention Pruning faithfulness tests (spec attention_pruning.md §7): statistics vs an fp64 brute force (per-row
and legacy counts, padding, causal, cross), threshold and ties, find_bounds, the random control, fully pruned
rows, the two execution modes against the original's finite-fill masking, mask -> layout and FLOPs, decoding
rows, and one-line errors for bad inputs."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bench.errors import BenchError  # noqa: E402
from bench.method import AttentionSpec, MethodContext  # noqa: E402
from kernels.block_sparse_attention import HAS_TRITON  # noqa: E402
from kernels.masks import block_sparse_flops, layout_from_element_mask  # noqa: E402
from methods import attention_pruning as AP  # noqa: E402

TRITON_OK = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _method(**kw):
    return AP.AttentionPruning(AP.APConfig(**kw))


def _spec(kind, L=24, Lk=None, H=2, D=16, layer=0):
    causal = kind == "decoder_self"
    stack = "encoder" if kind == "self" else "decoder"
    return AttentionSpec(layer=layer, n_heads=H, head_dim=D, max_len=L, causal=causal, kind=kind, stack=stack,
                         max_len_kv=Lk)


def _prefix_mask(lengths, L):
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]


def _brute(q, k, kmask, qlen, causal, legacy=False, R=None, C=None):
    """fp64: Σ P over examples / counts on the R x C grid; per-row (valid queries) or legacy per-element."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    R, C = R or Lq, C or Lk
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * D ** -0.5
    allowed = kmask[:, None, None, :].expand(B, 1, Lq, Lk).clone()
    if causal:
        allowed &= torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    S = torch.zeros(H, R, C, dtype=torch.float64)
    if legacy:
        S[:, :Lq, :Lk] = p.sum(0)
        cnt = torch.zeros(R, C, dtype=torch.float64)
        cnt[:Lq, :Lk] = B
        return torch.where(cnt > 0, S / cnt.clamp_min(1), 0.0)
    qvalid = _prefix_mask(qlen, Lq).double()
    S[:, :Lq, :Lk] = (p * qvalid[:, None, :, None]).sum(0)
    cnt = torch.zeros(R, dtype=torch.float64)
    cnt[:Lq] = qvalid.sum(0)
    return torch.where(cnt[None, :, None] > 0, S / cnt.clamp_min(1)[None, :, None], 0.0)


BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])


# ---- 1. statistics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["self", "decoder_self", "cross"])
@pytest.mark.parametrize("count", ["row", "legacy_batch"])
def test_statistics_equal_fp64_bruteforce(backend, kind, count):
    g = torch.Generator().manual_seed(1)
    R, C = 24, (20 if kind == "cross" else 24)
    m = _method(count=count, backend=backend, stats_flush_sequences=3)
    core = m.attention(_spec(kind, R, C if kind == "cross" else None))
    core.collector = AP.StatsCollector(2, core.R, core.C, core.spec.causal, count, backend, 3)
    ref_sum, ref_n = 0, 0
    batches = [([16, 11, 16, 7], [13, 13, 9, 4]), ([10, 3, 8], [18, 18, 2])]
    for qlens, klens in batches:
        B = len(qlens)
        Lq = max(qlens)
        Lk = max(klens) if kind == "cross" else Lq
        kl = klens if kind == "cross" else qlens
        q = torch.randn(B, 2, Lq, 16, generator=g)
        k = torch.randn(B, 2, Lk, 16, generator=g)
        kpm = _prefix_mask(kl, Lk)
        # decoder self-attention gets no key padding (causal + right padding); the target mask comes from the hook
        core.shared.query_mask = _prefix_mask(qlens, Lq) if kind != "self" else None
        core(q, k, k, None if kind == "decoder_self" else kpm)
        kmask = torch.ones(B, Lk, dtype=torch.bool) if kind == "decoder_self" else kpm
        if count == "row":
            ref = _brute(q, k, kmask, qlens, core.spec.causal, R=R, C=C)
            ref_sum = ref_sum + ref * _rows(qlens, R)[None, :, None]
            ref_n = ref_n + _rows(qlens, R)
        else:
            ref = _brute(q, k, kmask, qlens, core.spec.causal, legacy=True, R=R, C=C)
            cnt = torch.zeros(R, C, dtype=torch.float64)
            cnt[:Lq, :Lk] = B
            ref_sum = ref_sum + ref * cnt
            ref_n = ref_n + cnt
    mean = core.collector.mean()
    if count == "row":
        expect = torch.where(ref_n[None, :, None] > 0, ref_sum / ref_n.clamp_min(1)[None, :, None], 0.0)
        rows = mean.double().sum(-1)[:, ref_n > 0]
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)  # each row: a distribution
    else:
        expect = torch.where(ref_n > 0, ref_sum / ref_n.clamp_min(1), 0.0)
    torch.testing.assert_close(mean.double(), expect, atol=2e-6 if backend == "torch" else 2e-5, rtol=0)


def _rows(qlens, R):
    return _prefix_mask(qlens, R).double().sum(0)


def test_query_lengths_reject_left_padding():
    m = _method()
    core = m.attention(_spec("self", 8))
    core.collector = AP.StatsCollector(2, 8, 8, False)
    q = torch.randn(2, 2, 8, 16)
    kpm = torch.tensor([[False, True, True, True, True, True, True, True]] * 2)
    with pytest.raises(BenchError, match="right-padded"):
        core(q, q, q, kpm)


# ---- 2. thresholds, ties, bounds, random control -----------------------------------------------------------
def test_find_bounds_and_legacy_off_by_one():
    t = torch.zeros(6, 5)
    t[:4, :3] = 1.0
    assert AP.find_bounds(t) == (4, 3)
    assert AP.find_bounds(t, legacy=True) == (4, 3)
    full = torch.ones(6, 5)
    assert AP.find_bounds(full) == (6, 5)
    assert AP.find_bounds(full, legacy=True) == (5, 4)  # the paper code's off-by-one on a full grid


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 0.9, 0.95])
def test_kept_fraction_is_one_minus_tau_per_layer(tau):
    g = torch.Generator().manual_seed(3)
    H, R, C = 3, 20, 16
    mean = torch.rand(H, R, C, generator=g, dtype=torch.float64) + 1e-3  # no ties, no zeros: full box
    keep, facts = AP.ap_prune_mask(mean, tau)
    n = H * R * C
    theta = np.percentile(mean.numpy().ravel(), 100 * tau, method="nearest")
    assert facts["threshold"] == pytest.approx(float(theta))
    assert float(1 - keep.double().mean()) == pytest.approx((mean <= theta).double().mean().item())
    # 'nearest' picks index round_half_even(tau (n-1)): the pruned count is that index + 1
    assert int((~keep).sum()) == int(np.around(tau * (n - 1))) + 1
    assert abs(float(keep.double().mean()) - (1 - tau)) <= 1.0 / n + 1e-12
    # per-layer scope: one threshold shared by the heads (their kept fractions differ)
    keep_h, facts_h = AP.ap_prune_mask(mean, tau, scope="head")
    for h in range(H):
        th = np.percentile(mean[h].numpy().ravel(), 100 * tau, method="nearest")
        assert facts_h["threshold"][h] == pytest.approx(float(th))
        assert int((~keep_h[h]).sum()) == int(np.around(tau * (R * C - 1))) + 1


def test_ties_are_pruned_and_tau_zero_prunes_only_the_minimum():
    H, R, C = 2, 8, 8
    mean = torch.zeros(H, R, C, dtype=torch.float64)
    mean[:, :6, :6] = torch.rand(H, 6, 6, dtype=torch.float64) + 0.1
    mean[:, :6, :6] = mean[:, :6, :6].tril()  # causal-like zeros inside the box
    keep0, f0 = AP.ap_prune_mask(mean, 0.0)
    assert f0["box"] == [6, 6] and f0["threshold"] == 0.0
    assert torch.equal(keep0, mean > 0)  # tau=0: only the entries equal to the minimum (exact zeros)
    # ties at the threshold are pruned (<= theta): more than tau of the box when zeros dominate
    keep, f = AP.ap_prune_mask(mean, 0.3)
    box_pruned = 1 - keep[:, :6, :6].double().mean().item()
    assert f["threshold"] == 0.0 and box_pruned > 0.3
    assert not keep[:, 6:, :].any() and not keep[:, :, 6:].any()  # outside the observed box: pruned
    # tau counted over valid (causal) entries only (named deviation): a quantile of positive values
    keep_v, fv = AP.ap_prune_mask(mean, 0.3, causal=True, tau_counts="valid")
    assert fv["threshold"] > 0


def test_random_control_prunes_exactly_floor_tau_in_box():
    H, R, C = 2, 10, 12
    mean = torch.zeros(H, R, C)
    mean[:, :7, :9] = torch.rand(H, 7, 9) + 0.01
    g = torch.Generator().manual_seed(0)
    keep, f = AP.random_prune_mask(mean, 0.9, g)
    assert f["box"] == [7, 9]
    assert int((~keep).sum()) == math.floor(0.9 * H * 7 * 9)
    assert keep[:, 7:, :].all() and keep[:, :, 9:].all()  # outside the box: kept (unlike data-driven AP)
    keep2, _ = AP.random_prune_mask(mean, 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(keep, keep2)


def test_random_control_and_ap_reach_the_same_tau_through_the_method():
    m_ap, m_rand = _method(tau=0.6), _method(tau=0.6, control="random")
    for m in (m_ap, m_rand):
        for layer in range(2):
            m.attention(_spec("self", 16, layer=layer))
        g = torch.Generator().manual_seed(5)
        m._means = [torch.rand(2, 16, 16, generator=g) + 1e-3 for _ in range(2)]
        m._lengths = [{(16, 16): 4}, {(16, 16): 4}]
    ka, fa = m_ap.build_masks(m_ap.cfg.tau_for, with_facts=True)
    kr, fr = m_rand.build_masks(m_rand.cfg.tau_for, with_facts=True)
    for a, r in zip(fa, fr):
        assert a["grid_pruned_fraction"] == pytest.approx(0.6, abs=1e-2)
        assert r["grid_pruned_fraction"] == pytest.approx(0.6, abs=1e-2)
    assert not torch.equal(ka[0], kr[0])


def test_per_type_taus_and_pruned_types():
    cfg = AP.APConfig(tau=0.5, tau_cross=0.2, prune="enc_self+cross")
    assert cfg.tau_for("enc_self") == 0.5 and cfg.tau_for("cross") == 0.2 and cfg.tau_for("dec_self") is None
    assert AP.APConfig(tau=0.8).tau_for("dec_self") == 0.8


# ---- 3. masked attention: fully pruned rows, the two modes vs the original's finite fill -------------------
def _finite_fill_reference(q, k, v, keep, kpm, causal, r0=0):
    """The original code (fp64): pruned scores -> -1e9 (masked_fill), then padding / causal -> -inf."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * D ** -0.5
    s = s.masked_fill(~keep[None, :, r0:r0 + Lq, :Lk], -1e9)
    bad = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    if causal:
        bad |= ~torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    if kpm is not None:
        bad |= ~kpm[:, None, None, :]
    s = s.masked_fill(bad, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


MODES = [("dense_masked", "torch"), ("block_sparse", "torch")] + ([("block_sparse", "triton")] if TRITON_OK else [])


@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("kind", ["self", "decoder_self", "cross"])
def test_masked_core_matches_finite_fill_original(mode, backend, kind):
    g = torch.Generator().manual_seed(7)
    R, C = 32, (48 if kind == "cross" else 32)
    m = _method(mode=mode, backend=backend, block_size=16)
    core = m.attention(_spec(kind, R, C if kind == "cross" else None))
    keep = torch.rand(2, R, C, generator=g) > 0.7
    keep[0, 3, :] = False  # a fully pruned row in head 0
    keep[1, 5, :] = False
    core.set_mask(keep)
    B, Lq = 2, 30
    Lk = 40 if kind == "cross" else Lq
    q = torch.randn(B, 2, Lq, 16, generator=g, requires_grad=True)
    k = torch.randn(B, 2, Lk, 16, generator=g, requires_grad=True)
    v = torch.randn(B, 2, Lk, 16, generator=g, requires_grad=True)
    kpm = None if kind == "decoder_self" else _prefix_mask([Lk, Lk - 9], Lk)
    out = core(q, k, v, kpm)
    ref = _finite_fill_reference(q, k, v, keep, kpm, core.spec.causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert core.calls == 1
    # gradients against the fp64 reference (fully pruned rows: no gradient into q or k)
    w = torch.randn(out.shape, generator=g)
    gq, gk, gv = torch.autograd.grad((out * w).sum(), (q, k, v))
    rq, rk, rv = torch.autograd.grad((ref * w.double()).sum(), (q, k, v))
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=1e-3)
    assert gq[0, 0, 3].abs().max() == 0 and gq[0, 1, 5].abs().max() == 0


def test_fully_pruned_rows_are_uniform_or_zero():
    g = torch.Generator().manual_seed(2)
    for causal_kind in ("self", "decoder_self"):
        for rule in ("uniform", "zero"):
            m = _method(empty_rows=rule)
            core = m.attention(_spec(causal_kind, 16))
            core.set_mask(torch.zeros(2, 16, 16, dtype=torch.bool))  # everything pruned
            q, v = torch.randn(2, 2, 16, 16, generator=g), torch.randn(2, 2, 16, 16, generator=g)
            kpm = None if causal_kind == "decoder_self" else _prefix_mask([16, 10], 16)
            out = core(q, q, v, kpm)
            if rule == "zero":
                assert out.abs().max() == 0
                continue
            if causal_kind == "self":
                exp = torch.stack([v[0].mean(1, keepdim=True).expand(2, 16, 16),
                                   v[1, :, :10].mean(1, keepdim=True).expand(2, 16, 16)])
            else:
                exp = v.cumsum(2) / torch.arange(1, 17)[None, None, :, None]
            torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)


def test_layout_and_flops_of_block_sparse_mode():
    m = _method(mode="block_sparse", block_size=16, backend="torch")
    core = m.attention(_spec("decoder_self", 64))
    keep = torch.zeros(2, 64, 64, dtype=torch.bool)
    keep[:, :, :16] = True  # only the first key block
    keep[:, torch.arange(64), torch.arange(64)] = True  # and the diagonal
    core.set_mask(keep)
    q = torch.randn(3, 2, 64, 16)
    lay_dev, packed, lay = core._block(0, 64, 64, q.device)
    pooled = torch.nn.functional.max_pool2d((keep & torch.ones(64, 64, dtype=torch.bool).tril()).float()[:, None],
                                            16)[:, 0] > 0
    assert torch.equal(lay, pooled)  # "any element kept" rule = maxpool(keep, B) > 0
    f = core.flops(q, q)
    assert f == block_sparse_flops(lay, 16, 3, 16, True, 64, 64, n_heads=2)
    dense = AP.AttentionCore.flops(core, q, q)
    assert f < dense
    core.cfg = AP.APConfig(mode="dense_masked")
    assert core.flops(q, q) == dense  # dense masking computes everything
    assert torch.equal(layout_from_element_mask(keep, 16, causal=True), lay)


def test_mask_facts_length_weighted_and_by_block():
    keep = torch.ones(1, 8, 8, dtype=torch.bool)
    keep[0, :, 4:] = False
    f = AP.mask_facts(keep, False, {(4, 4): 3, (8, 8): 1}, blocks=(4,))
    # sequences of length 4 keep everything, the one of length 8 keeps half: (3*16 + 32) / (3*16 + 64)
    assert f["valid_pruned_fraction_observed"] == pytest.approx(1 - (3 * 16 + 32) / (3 * 16 + 64))
    assert f["grid_pruned_fraction"] == pytest.approx(0.5)
    assert f["by_block_size"]["4"]["block_density"] == pytest.approx(0.5)


# ---- 4. decoding: the mask row of the current step in self- and cross-attention ------------------------------
def test_incremental_decoding_uses_the_teacher_forced_mask_rows():
    from bench.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

    torch.manual_seed(0)
    cfg = Seq2SeqConfig(n_enc_layers=1, n_dec_layers=2, d_model=32, n_heads=2, d_ff=32, dropout=0.0,
                        max_src_len=16, max_tgt_len=12)
    m = _method(tau=0.5)
    model = Seq2SeqTransformer(cfg, m, vocab_size=30).eval()
    g = torch.Generator().manual_seed(1)
    for core in m.cores:
        keep = torch.rand(2, core.R, core.C, generator=g) > 0.5
        keep[:, :, 0] = True
        core.set_mask(keep)
    src = torch.randint(3, 30, (2, 9), generator=g)
    src_mask = _prefix_mask([9, 6], 9)
    tgt = torch.randint(3, 30, (2, 7), generator=g)
    with torch.no_grad():
        full = model(src, src_mask, tgt)
        memory, mmask = model.encode(src, src_mask)
        caches = model.init_cache(memory)
        for t in range(tgt.shape[1]):
            step = model.decode_step(tgt[:, t], caches, mmask, t)
            torch.testing.assert_close(step, full[:, t], atol=1e-4, rtol=1e-4)


# ---- 5. bad inputs: one-line errors --------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1])
def test_tau_outside_unit_interval_is_one_line(bad):
    with pytest.raises(BenchError) as e:
        AP.APConfig(tau=bad)
    assert "\n" not in str(e.value) and "[0, 1)" in str(e.value)
    from bench.cli import build_run_config, parse_method_spec

    with pytest.raises(BenchError) as e2:
        build_run_config("wikitext2", parse_method_spec(f"attention_pruning:tau={bad}"), "tiny", 0, "cpu", [])
    assert "\n" not in str(e2.value) and "tau" in str(e2.value)


def test_bad_option_values_name_the_option():
    for kw in ({"mode": "sparse"}, {"control": "shuffle"}, {"prune": "enc"}, {"sweep": "0.5/2"}):
        with pytest.raises(BenchError) as e:
            AP.APConfig(**kw)
        assert next(iter(kw)) in str(e.value) and "\n" not in str(e.value)


def test_mask_of_another_shape_is_one_line():
    m = _method()
    core = m.attention(_spec("self", 16))
    with pytest.raises(BenchError) as e:
        core.set_mask(torch.ones(2, 32, 32, dtype=torch.bool))
    assert "(2, 16, 16)" in str(e.value) and "\n" not in str(e.value)


def test_statistics_from_another_task_or_checkpoint_are_one_line():
    m = _method()
    model = torch.nn.Linear(3, 3)
    for i in range(2):
        m.attention(_spec("self", 16, layer=i))
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(task="glue_rte", seed=0), model=model)
    good = {"version": AP.STATS_VERSION, "task": "glue_rte", "cores": m._identity(trainer)["cores"],
            "checkpoint": AP.weights_fingerprint(model), "means": [torch.zeros(2, 16, 16)] * 2,
            "lengths": [{}, {}], "split": "train", "count": "row", "batches": 1, "sequences_per_core": [1, 1]}
    m.check_stats(trainer, good)
    for change, needle in (({"task": "glue_sst2"}, "task 'glue_sst2'"), ({"checkpoint": "0" * 16}, "checkpoint"),
                           ({"cores": good["cores"][:1]}, "another shape"), ({"version": 0}, "payload")):
        with pytest.raises(BenchError) as e:
            m.check_stats(trainer, {**good, **change})
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_default_config_block_size_follows_length():
    lm = types.SimpleNamespace(ctx=512)
    assert AP.AttentionPruning.default_config(MethodContext("wikitext2", "lm", "small", None, lm)).block_size == 64
    glue = types.SimpleNamespace(max_len=128)
    assert AP.AttentionPruning.default_config(MethodContext("glue_rte", "glue", "small", None, glue)).block_size == 16


# ---- 6. the staged protocol through the Trainer (tiny, CPU) ---------------------------------------------------
from pathlib import Path  # noqa: E402

MT_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mt"
MT_OV = ["train.steps=6", "train.eval_every=100", "train.batch_size=16", "data.max_train_examples=64",
         "data.max_eval_examples=8", "data.dev_decode_max=8", "train.throughput_batches=1", "train.timing_warmup_steps=0"]


def _mt_cfg(spec_text):
    from bench.cli import build_run_config, parse_method_spec

    spec = parse_method_spec(spec_text)
    return spec, build_run_config("mt_multi30k", spec, "tiny", 0, "cpu", MT_OV)


def _trainer_runs_stages() -> bool:
    import inspect

    from bench.train import Trainer

    return "artifacts" in inspect.signature(Trainer.__init__).parameters


needs_stages = pytest.mark.skipif(not _trainer_runs_stages(), reason="bench.train.Trainer does not run stages yet")


class _Spy(AP.AttentionPruning):
    """Records, per core, the masked forwards seen during the masked training stage."""

    def on_stage_start(self, trainer, stage):
        super().on_stage_start(trainer, stage)
        if stage.name == "masked":
            self._c0 = [c.train_calls for c in self.cores]

    def on_stage_end(self, trainer, stage):
        super().on_stage_end(trainer, stage)
        if stage.name == "masked":
            self.masked_calls = [c.train_calls - a for c, a in zip(self.cores, self._c0)]


@needs_stages
@pytest.mark.parametrize("prune", ["all", "enc_self+cross"])
def test_masked_stage_uses_the_mask_in_every_layer_and_type(tmp_path, monkeypatch, prune):
    from bench.artifacts import ArtifactStore
    from bench.registry import get_task
    from bench.train import Trainer

    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    spec, cfg = _mt_cfg(f"attention_pruning:dense_steps=3,masked_steps=3,tau=0.5,prune={prune}")
    task = get_task("mt_multi30k")(cfg, MT_FIXTURE)
    method = _Spy(cfg.method_cfg, task)
    store = ArtifactStore(tmp_path / "art", log=lambda s: None)
    Trainer(cfg, task, method, torch.device("cpu"), progress=False, log=lambda s: None, artifacts=store).run()
    types_seen = {c.type for c in method.cores}
    assert types_seen == {"enc_self", "dec_self", "cross"}
    wanted = set(AP.APConfig(prune=prune).pruned_types)
    for core, n in zip(method.cores, method.masked_calls):
        if core.type in wanted:  # 3 steps: every pruned layer ran masked in every training forward
            assert core.keep is not None and n == 3, (core.type, core.spec.layer, n)
        else:
            assert core.keep is None and n == 0, (core.type, core.spec.layer, n)


@needs_stages
def test_staged_tiny_run_reuses_the_dense_artifact(tmp_path, monkeypatch):
    from bench.cli import run_one

    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSEBENCH_ARTIFACTS", str(tmp_path / "artifacts"))
    recs = []
    for text in ("attention_pruning:dense_steps=3,masked_steps=3,tau=0.5",
                 "attention_pruning:dense_steps=3,masked_steps=3,tau=0.8,sweep=0.2"):
        spec, cfg = _mt_cfg(text)
        recs.append(run_one("mt_multi30k", spec, 0, cfg, torch.device("cpu"), MT_FIXTURE, "tiny", False).to_dict()
)
    first, second = recs
    used = lambda r: {a["kind"]: a for a in r["artifacts"]}  # noqa: E731
    assert not used(first)["dense_checkpoint"]["reused"] and not used(first)["attention_stats"]["reused"]
    assert used(second)["dense_checkpoint"]["reused"] and used(second)["attention_stats"]["reused"]
    assert used(first)["dense_checkpoint"]["key"] == used(second)["dense_checkpoint"]["key"]
    st = {s["name"]: s for s in second["stages"]}
    assert st["dense"].get("reused_from") and st["attention_stats"]["reused"]
    ck = [r["method_info"]["statistics"]["dense_checkpoint_sha256_16"] for r in recs]
    assert ck[0] == ck[1]
    s1, s2 = (r["method_info"]["summary"]["grid_pruned_fraction"] for r in recs)
    assert s1 < s2  # tau 0.5 vs 0.8 from the same statistics
    assert len(second["operating_points"]) == 1

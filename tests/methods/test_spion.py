"""SPION faithfulness tests (spion.md §7): filter, flood fill vs the original recursive routine, threshold,
SPION-C count, the transition criterion, and one tiny end-to-end run through the Trainer."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.method import AttentionSpec, MethodContext
from methods import spion as S


# ---- 1. the diagonal filter ----------------------------------------------------------------------------
@pytest.mark.parametrize("L", [64, 256])
def test_filter_is_diagonal_window_sum(L):
    g = torch.Generator().manual_seed(L)
    A = torch.rand(L, L, generator=g)
    C = S.diagonal_filter(A, 31)
    ref = torch.zeros(L, L, dtype=torch.float64)
    Ad = A.double()
    for t in range(-15, 16):  # C[i, j] = sum_t A[i+t, j+t], zero outside the matrix
        lo, hi = max(0, -t), min(L, L - t)
        ref[lo:hi, lo:hi] += Ad[lo + t:hi + t, lo + t:hi + t]
    assert C.shape == (L, L) and C.dtype == torch.float32
    torch.testing.assert_close(C.double(), ref, rtol=1e-5, atol=1e-5)


# ---- 2. flood fill ---------------------------------------------------------------------------------------
def _recursive_flood_fill(data, x, y, ff_mat, thresh):
    """NumPy port of the original recursive routine (main_conv_ff.py ``flood_fill``): ``data`` has one zero
    row/column of padding; marked cells store their score and the layout is ``ff_mat > 0``."""
    if x + 1 == data.shape[0] or y + 1 == data.shape[1]:
        return
    if data[x + 1][y] > data[x][y + 1]:
        nxt = (x + 1, y) if data[x + 1][y] > data[x + 1][y + 1] else (x + 1, y + 1)
    else:
        nxt = (x, y + 1) if data[x][y + 1] > data[x + 1][y + 1] else (x + 1, y + 1)
    if data[nxt] > thresh:
        ff_mat[nxt] = data[nxt]
    _recursive_flood_fill(data, nxt[0], nxt[1], ff_mat, thresh)


def _reference_layout(pooled: np.ndarray, thresh) -> np.ndarray:
    nb = pooled.shape[0]
    tmp = np.zeros((nb + 1, nb + 1), dtype=np.float32)
    tmp[:-1, :-1] = pooled
    ff = np.zeros((nb + 1, nb + 1), dtype=np.float32)  # +1: a padding cell may be "entered" (never marked)
    th = np.float32(thresh)
    for k in range(nb):
        _recursive_flood_fill(tmp, 0, k, ff, th)
    for k in range(nb):
        _recursive_flood_fill(tmp, k, 0, ff, th)
    mat = ff[:nb, :nb] > 0
    np.fill_diagonal(mat, True)
    return mat


def _random_pooled(rng: np.random.Generator, nb: int, kind: int) -> np.ndarray:
    if kind == 0:  # plain uniform scores
        return rng.random((nb, nb), dtype=np.float32)
    if kind == 1:  # few distinct values: many ties in the three-way comparisons
        return (rng.integers(0, 4, (nb, nb)) / 4).astype(np.float32)
    # an attention-like map: a real softmax map, filtered and pooled as SPION does; the filter is computed as
    # the diagonal window sum test 1 checks diagonal_filter against (diagonal_filter's 31x31 conv2d is 30x the
    # work, and without oneDNN an im2col of ~1 GB per 512x512 map: it dominated this test on a busy 2-core box)
    L = nb * 8
    s = torch.from_numpy(rng.standard_normal((L, L), dtype=np.float32)) * 2
    s += 3 * torch.eye(L) + 2 * torch.eye(L).roll(int(rng.integers(1, L)), 1)
    A = torch.softmax(s, -1)
    C = torch.zeros_like(A)
    for t in range(-15, 16):  # C[i, j] = sum_{|t| <= 15} A[i+t, j+t], zero outside: diagonal_filter(A, 31)
        lo, hi = max(0, -t), min(L, L - t)
        C[lo:hi, lo:hi] += A[lo + t:hi + t, lo + t:hi + t]
    return S.pool_blocks(C, 8).numpy()


def test_flood_fill_matches_recursive_original():
    rng = np.random.default_rng(0)
    n = 0
    for nb in (16, 32, 64):
        for q in (0.96, 0.98, 0.99):
            for rep in range(23):
                pooled = _random_pooled(rng, nb, rep % 3)
                theta = S.block_threshold(torch.from_numpy(pooled), q)
                got = S.flood_fill(torch.from_numpy(pooled), theta)
                np.testing.assert_array_equal(got, _reference_layout(pooled, theta.item()),
                                              err_msg=f"nb={nb} q={q} rep={rep}")
                n += 1
    assert n >= 200


def _expected(nb, extra):
    m = np.eye(nb, dtype=bool)
    for i, j in extra:
        m[i, j] = True
    return m


def test_flood_fill_hand_cases():
    # three-way ties go diagonal: start cells (0, k) / (k, 0) off the diagonal are never entered
    ones = np.ones((4, 4), np.float32)
    want = np.ones((4, 4), bool)
    want[0, 1:] = want[1:, 0] = False
    np.testing.assert_array_equal(S.flood_fill(ones, 0.5), want)
    # down == right > diag: right wins; the start cell (1, 0) scores above theta but is never marked
    P = np.zeros((4, 4), np.float32)
    P[0, 1] = P[1, 0] = 5
    P[1, 1] = 1
    np.testing.assert_array_equal(S.flood_fill(P, 0.5), _expected(4, [(0, 1)]))
    # the threshold is strict: a score equal to theta is not kept
    P = np.zeros((4, 4), np.float32)
    P[0, 1] = 2
    np.testing.assert_array_equal(S.flood_fill(P, 2.0), _expected(4, []))
    np.testing.assert_array_equal(S.flood_fill(P, 1.999), _expected(4, [(0, 1)]))
    # border: a path that reaches the last row walks right along it (the padding row is 0)
    P = np.zeros((4, 4), np.float32)
    P[3, 1:] = 3
    np.testing.assert_array_equal(S.flood_fill(P, 0.5), _expected(4, [(3, 1), (3, 2)]))
    for P, th in ((ones, 0.5), (P, 0.5)):
        np.testing.assert_array_equal(S.flood_fill(P, th), _reference_layout(P, th))


def test_flood_fill_invariants():
    rng = np.random.default_rng(1)
    for nb, q in ((16, 0.96), (32, 0.98), (64, 0.99)):
        for kind in range(3):
            pooled = torch.from_numpy(_random_pooled(rng, nb, kind))
            theta = S.block_threshold(pooled, q)
            keep = S.flood_fill(pooled, theta)
            assert keep.diagonal().all()
            off = keep & ~np.eye(nb, dtype=bool)
            assert (pooled.numpy()[off] > theta.item()).all()
            n_above = int((pooled > theta).sum())
            assert keep.sum() <= n_above + nb


def test_threshold_is_linear_quantile():
    g = torch.Generator().manual_seed(0)
    for nb in (16, 32, 64):
        pooled = torch.rand(nb, nb, generator=g)
        for q in (0.96, 0.98, 0.99):
            th = S.block_threshold(pooled, q)
            torch.testing.assert_close(th, torch.quantile(pooled.flatten(), q, interpolation="linear"))
            v = np.sort(pooled.flatten().numpy().astype(np.float64))
            pos = q * (v.size - 1)  # linear interpolation between order statistics
            lo = int(np.floor(pos))
            assert abs(th.item() - (v[lo] + (pos - lo) * (v[min(lo + 1, v.size - 1)] - v[lo]))) < 1e-6


def test_spion_c_topk_count_and_diagonal():
    nb, density = 32, 0.04
    k = int(nb * nb * density - nb)  # = 8
    pooled = torch.rand(nb, nb, generator=torch.Generator().manual_seed(0)) * 0.1
    offdiag = [(0, 5), (3, 9), (7, 1), (10, 20), (30, 2), (12, 13), (25, 24), (4, 31)]
    for i, j in offdiag:
        pooled[i, j] = 10.0
    keep = S.topk_blocks(pooled, density)
    assert keep.sum() == k + nb and keep.diagonal().all()
    assert all(keep[i, j] for i, j in offdiag)
    pooled.fill_diagonal_(100.0)  # top-k now all diagonal: nnz = |topk ∪ diag| = nb, density below target
    assert S.topk_blocks(pooled, density).sum() == nb
    # through the whole generator (filter + pooling) at L = 512, B = 16
    A = torch.softmax(torch.randn(512, 512, generator=torch.Generator().manual_seed(1)), -1)
    lay, facts = S.spion_layout(A, "c", 16, 0.98, density, 31)
    assert facts["topk"] == k and k + 1 <= lay.sum() <= k + nb and lay.diagonal().all()
    assert S.topk_blocks(torch.rand(8, 8), 0.04).sum() == 8  # k < 0 at tiny nb: diagonal only


# ---- 3. the transition criterion --------------------------------------------------------------------------
def _maps(coefs, L=64):
    """Per-layer maps base + c * E with ||E||_F = 1, so ||M_a - M_b||_F = |c_a - c_b| exactly."""
    E = torch.zeros(L, L)
    E[0, 0] = 1.0
    return [torch.full((L, L), 1.0 / L) + c * E for c in coefs]


def test_criterion_quirks_and_truncation():
    # layer 0: c = 0, 10, 11.59, ... -> check 3: d_cur = 11.59 vs d_prev = 10 -> delta 15.9 %, int -> 15: no
    crit = S.TransitionCriterion(15)
    assert crit.update(_maps([0.0])) == (False, None)  # check 1: sets R
    assert crit.update(_maps([10.0])) == (False, None)  # check 2: d_prev; R stays the check-1 map
    fire, d = crit.update(_maps([11.59]))
    assert not fire and abs(d[0] - 15.9) < 1e-3
    # check 4: R was reset to the check-3 map; d_cur = |11.59 - c4| vs d_prev = 11.59; 14.9 % -> fires
    fire, d = crit.update(_maps([11.59 + 11.59 * 1.149]))
    assert fire and abs(d[0] - 14.9) < 1e-3 and int(d[0]) == 14


def test_criterion_never_before_check_3_and_all_layers_must_agree():
    crit = S.TransitionCriterion(15)
    assert crit.update(_maps([0.0, 0.0])) == (False, None)
    assert crit.update(_maps([1.0, 1.0])) == (False, None)  # check 2 never fires, whatever the maps
    # check 3 (R = check-1 maps): layer 0 |0 - 1| = 1 vs 1 -> 0 %; layer 1 |0 - 4| = 4 vs 1 -> 300 %
    fire, d = crit.update(_maps([1.0, 4.0]))
    assert not fire and [round(x) for x in d] == [0, 300]
    # check 4 (R = check-3 maps): layer 0 |1 - 2| = 1 vs 1; layer 1 |4 - 8| = 4 vs 4 -> all 0 % -> fires
    fire, d = crit.update(_maps([2.0, 8.0]))
    assert fire and d == [0.0, 0.0]


class _FakeTrainer:
    def __init__(self, steps, eval_every, task=None):
        self.cfg = types.SimpleNamespace(train=types.SimpleNamespace(steps=steps, eval_every=eval_every))
        self.phase, self.events, self.restarts, self.task = "train", [], [], task

    def note(self, event, **info):
        self.events.append({"event": event, **info})

    def end_stage(self):
        self.ended = True


def _drive(method, trainer, maps_at_check):
    """Run the hook and stage sequence of bench.train.Trainer; the cores' maps come from ``maps_at_check(check)``."""
    checks = {"n": 0}

    def take_map_factory(layer):
        def take():
            return maps_at_check(checks["n"])[layer]
        return take

    for core in method.cores:
        core.take_map = take_map_factory(core.spec.layer)
    dense, sparse = method.stages(trainer)
    assert (dense.name, sparse.name, sparse.steps, sparse.optimizer) == ("dense", "sparse", "rest", "continue")
    method.on_train_start(trainer)
    trainer.phase, trainer.ended = "dense", False
    phases = []
    tc = trainer.cfg.train
    for step in range(tc.steps):
        if trainer.ended and trainer.phase == "dense":  # the Trainer starts the next stage
            trainer.phase = "sparse"
            if sparse.lr_schedule == "new":
                trainer.restarts.append(sparse.schedule_steps)
        method.before_step(trainer, step)
        phases.append(trainer.phase)
        if (step + 1) % method.check_every == 0:
            checks["n"] += 1
        method.after_step(trainer, step)
        if (step + 1) % tc.eval_every == 0 or step == tc.steps - 1:
            method.on_eval(trainer, step, {"accuracy": float(step)})
    return phases


def _method(cls, L=64, layers=2, **cfg):
    task = types.SimpleNamespace(MAIN_METRIC="accuracy", METRICS={"accuracy": True})
    m = cls(S.SpionConfig(block_size=16, **cfg), task)
    for i in range(layers):
        m.attention(AttentionSpec(layer=i, n_heads=2, head_dim=16, max_len=L))
    return m


@pytest.mark.parametrize("cls,restart", [(S.SpionCF, True), (S.SpionC, True), (S.SpionF, False)])
def test_transition_step_through_hooks(cls, restart):
    # maps A + c * I / 8 (||I / 8||_F = 1): distances are |c_a - c_b|. Deltas per layer:
    # check 3: 100 %, 200 %; check 4: 50 %, 50 %; check 5: 0 %, 6.7 % -> transition at check 5
    coefs = {1: (0, 0), 2: (1, 1), 3: (2, 3), 4: (3, 4.5), 5: (4, 6.1)}
    A = _maps([0, 0])[0]
    m = _method(cls)
    tr = _FakeTrainer(steps=100, eval_every=10)
    phases = _drive(m, tr, lambda n: [A + c * torch.eye(64) / 8 for c in coefs[min(n, 5)]])
    assert m.transition_check == 5 and m.transition_step == 5 * 10 - 1
    assert tr.restarts == ([100] if restart else [])
    assert phases[49] == "dense" and phases[50] == "sparse" and phases[0] == "dense"
    info = m.info()
    json.dumps(info)
    assert info["transition_step"] == 49 and len(info["delta_trace"]) == 3
    assert len(info["layouts"]) == 2 and all(d > 0 for d in info["density_per_layer"])
    assert info["best_checkpoint_eval_phase"] == "sparse"  # last eval has the highest fake metric
    assert [e["phase"] for e in info["eval_phases"]][4:6] == ["dense", "sparse"]


def test_max_dense_steps_safeguard_is_logged():
    A = _maps([0, 0])[0]
    m = _method(S.SpionCF, max_dense_steps=40)
    tr = _FakeTrainer(steps=60, eval_every=10)
    _drive(m, tr, lambda n: [A * (1 + n * n), A * (1 + n ** 3)])  # never stable
    assert m.transition_step == 39 and m.forced
    assert any("safeguard" in e["event"] for e in tr.events)
    m = _method(S.SpionCF)  # off by default: stays dense
    tr = _FakeTrainer(steps=60, eval_every=10)
    _drive(m, tr, lambda n: [A * (1 + n * n), A * (1 + n ** 3)])
    assert m.transition_step is None and m.info()["tested_with"] == "dense"


def test_capture_first_call_only_and_padding_check():
    m = _method(S.SpionCF, layers=1)
    core = m.cores[0]
    g = torch.Generator().manual_seed(0)
    q1, k1, v1, q2, k2, v2 = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(6))
    core.train()
    core.arm()
    core(q1, k1, v1)
    core(q2, k2, v2)  # Retrieval's second document: not captured
    from kernels import attention_stats
    torch.testing.assert_close(core.take_map(), attention_stats(q1, k1, per_head=False))
    with pytest.raises(BenchError, match="power of two"):
        m.attention(AttentionSpec(layer=1, n_heads=2, head_dim=16, max_len=2000))


def test_avg_over_k_batches_arms_the_last_k_steps():
    m = _method(S.SpionCF, layers=1, avg_over_k_batches=3, check_every=10)
    tr = _FakeTrainer(steps=20, eval_every=10)
    m.on_train_start(tr)
    armed = []
    for step in range(10):
        m.before_step(tr, step)
        armed.append(m.cores[0].capture)
        m.cores[0].capture = False  # as if the step's forward consumed it
    assert armed == [False] * 7 + [True] * 3


def _ctx(task, scale):
    from bench.registry import get_task

    model, data, _, _ = get_task(task).presets(scale)
    return MethodContext(task=task, suite="lra", scale=scale, model=model, data=data)


def test_default_config_per_task():
    assert S.SpionCF.family == S.SpionC.family == S.SpionF.family == "learned_pattern"
    c = S.SpionCF.default_config(_ctx("lra_text", "paper"))
    assert (c.block_size, c.quantile, c.density, c.softmax_mode) == (64, 0.99, 0.03, "phantom_zero")
    c = S.SpionC.default_config(_ctx("lra_image", "small"))
    assert (c.block_size, c.quantile, c.density) == (32, 0.96, 0.04)
    c = S.SpionF.default_config(_ctx("lra_retrieval", "paper"))
    assert (c.quantile, c.density) == (0.99, 0.021)
    c = S.SpionCF.default_config(_ctx("lra_listops", "tiny"))
    assert (c.block_size, c.check_every) == (16, 10)
    assert c.note == ("tiny scale: block_size 64 -> 16 so that nb = L / B >= 4 (L = 128); "
                      "tiny scale: transition checked every 10 steps (not at eval steps)")


# ---- 4. end to end ---------------------------------------------------------------------------------------
def test_end_to_end_tiny_listops(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    from bench import registry
    from bench.cli import MethodSpec, build_run_config
    from bench.train import Trainer

    cfg = build_run_config("lra_listops", MethodSpec("spion_cf"), "tiny", 0, "cpu",
                           ["train.steps=60", "train.eval_every=20", "method.check_every=10",
                            "method.max_dense_steps=50", "data.n_train=400", "data.n_dev=64", "data.n_test=64"])
    task = registry.get_task("lra_listops")(cfg, None)
    method = registry.get_method("spion_cf")(cfg.method_cfg, task)
    trainer = Trainer(cfg, task, method, torch.device("cpu"), progress=False, log=lambda *a: None)
    rec = trainer.run()
    info = rec.method_info
    json.dumps(info)
    assert info["transition_step"] is not None and (info["transition_step"] + 1) % 10 == 0
    assert info["transition_step"] <= 49 and info["tested_with"] == "sparse"
    assert info["spion_variant"] == "spion_cf" and info["softmax_mode"] == "phantom_zero"
    assert len(info["layouts"]) == 2 and len(info["layouts"][0]) == 128 // 16
    assert all(0 < d <= 1 for d in info["density_per_layer"])
    by_phase = rec.measurements["train_steps_timed_by_phase"]
    assert by_phase.get("dense", 0) > 0 and by_phase.get("sparse", 0) > 0
    # the layouts survive the best-checkpoint reload (they are not in the state_dict)
    assert not any("layout" in k for k in trainer.model.state_dict())
    assert all(c.layout is not None for c in method.cores)
    assert torch.isfinite(torch.tensor(rec.metrics["accuracy"]))

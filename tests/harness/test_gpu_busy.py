"""GPU-busy fraction per training step (bench.measure.BusyProfiler), on CPU: the interval union on hand-made
intervals, the window logic with a fake profiler and a fake clock (never wall time), and the record fields."""
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

import bench.measure as M
from bench.cli import build_run_config, parse_method_spec
from bench.registry import get_task
from bench.train import Trainer
from methods.dense import Eager


def test_interval_union_counts_overlaps_once():
    assert M.interval_union_ns([]) == 0
    assert M.interval_union_ns([(0, 10)]) == 10
    # overlapping, touching, nested, unsorted, empty and reversed intervals
    assert M.interval_union_ns([(20, 30), (0, 10), (5, 15), (30, 31), (40, 40), (50, 45)]) == 15 + 11
    assert M.interval_union_ns([(0, 100), (10, 20), (99, 100)]) == 100
    assert M.interval_union_ns([(0, 1), (2, 3), (4, 5)]) == 3


def test_device_activity_sums_kernels_copies_and_sets_but_not_annotations():
    events = [("kernel", 0, 30), ("kernel", 20, 50), ("gpu_memcpy", 60, 70), ("gpu_memset", 65, 75),
              ("gpu_user_annotation", 0, 1000), ("cuda_runtime", 0, 500)]
    busy, kernels = M.device_activity(events)
    assert busy == 50 + 15 and kernels == 2


class _Event:
    def __init__(self, kind, s, e):
        self.kind, self.s, self.e = kind, s, e

    def device_type(self):
        return DeviceType.CUDA

    def activity_type(self):
        return self.kind

    def name(self):
        return self.kind

    def start_ns(self):
        return self.s

    def end_ns(self):
        return self.e


class _FakeProfile:
    """Stands in for torch.profiler.profile: every window 'records' two overlapping kernels, a memcpy and a GPU
    annotation spanning everything: busy = 60 ns, 2 kernels."""
    made = []

    def __init__(self, activities):
        _FakeProfile.made.append(self)
        self.started = self.stopped = False
        events = [_Event("kernel", 0, 30), _Event("kernel", 20, 50), _Event("gpu_memcpy", 60, 70),
                  _Event("gpu_user_annotation", 0, 10_000)]
        self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events))

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True


@pytest.fixture
def fake_cuda(monkeypatch):
    """A fake profiler, a no-op synchronize and a fake clock that advances 100 ns per reading."""
    import torch.profiler

    _FakeProfile.made.clear()
    clock = {"t": 0}

    def ns():
        clock["t"] += 100
        return clock["t"]

    monkeypatch.setattr(torch.profiler, "profile", _FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(M, "time", SimpleNamespace(perf_counter=M.time.perf_counter, perf_counter_ns=ns))
    return clock


def test_cpu_profiler_measures_nothing():
    b = M.BusyProfiler(torch.device("cpu"), after_steps=0)
    assert not any(b.profiling("train") for _ in range(10))
    out = b.summary()
    assert out["gpu_busy_fraction"] is None and out["kernel_launches_per_step"] is None
    assert "not measured on CPU" in out["gpu_busy_note"]


def test_window_after_warmup_then_once_per_phase(fake_cuda):
    b = M.BusyProfiler(SimpleNamespace(type="cuda"), after_steps=2, steps=3)
    flags = []
    for phase in ["dense"] * 8 + ["sparse"] * 4:
        p = b.profiling(phase)
        flags.append(p)
        if p:
            b.step_done()
    # dense: 2 warm-up steps, 3 profiled, then never again; sparse: its own warm-up, then profiled to its end
    assert flags == [False, False, True, True, True, False, False, False, False, False, True, True]
    out = b.summary()
    assert out["gpu_busy_steps"] == 5
    assert out["gpu_busy_fraction_by_phase"] == {"dense": 0.6, "sparse": 0.6}  # 60 ns busy / 100 ns wall
    assert out["kernel_launches_per_step_by_phase"] == {"dense": 2 / 3, "sparse": 1.0}
    assert out["gpu_busy_fraction"] == pytest.approx(0.6) and out["kernel_launches_per_step"] == pytest.approx(4 / 5)
    assert all(p.started and p.stopped for p in _FakeProfile.made) and len(_FakeProfile.made) == 2


def test_profiler_errors_never_stop_a_run(fake_cuda, monkeypatch):
    import torch.profiler

    def broken(**kw):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    b = M.BusyProfiler(SimpleNamespace(type="cuda"), after_steps=0, steps=2)
    assert not b.profiling("train")
    out = b.summary()
    assert out["gpu_busy_fraction"] is None and "CUPTI unavailable" in out["gpu_busy_note"]


def test_a_window_without_kernels_is_not_a_zero(fake_cuda):
    b = M.BusyProfiler(SimpleNamespace(type="cuda"), after_steps=0, steps=1)
    assert b.profiling("train")
    b._active["prof"].profiler.kineto_results.events = lambda: []
    b.step_done()
    out = b.summary()
    assert out["gpu_busy_fraction"] is None and "recorded no device kernel" in out["gpu_busy_note"]


def _listops(tmp_path, monkeypatch, *extra):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path))
    cfg = build_run_config("lra_listops", parse_method_spec("eager"), "tiny", 0, "cpu",
                           ["train.steps=40", "train.eval_every=10", "data.n_train=200", "data.n_dev=40",
                            "data.n_test=40", *extra])
    task = get_task("lra_listops")(cfg, None)
    return cfg, task


def test_cpu_record_stores_none(tmp_path, monkeypatch):
    cfg, task = _listops(tmp_path, monkeypatch)
    rec = Trainer(cfg, task, Eager(cfg.method_cfg, task), torch.device("cpu"), progress=False, log=lambda s: None).run()
    m = rec.measurements
    assert m["gpu_busy_fraction"] is None and m["kernel_launches_per_step"] is None
    assert m["gpu_busy_note"] == "not measured on CPU"
    assert m["train_steps_timed"] == 40 - 5  # nothing profiled: every step after the timing warm-up is timed


@pytest.mark.parametrize("warmup, profiled", [(5, 3), (8, 2)])  # (8, 2): the eval after step 10 closes the window
def test_profiled_steps_are_left_out_of_the_step_times(tmp_path, monkeypatch, fake_cuda, warmup, profiled):
    import bench.train

    monkeypatch.setattr(bench.train, "BusyProfiler",
                        lambda device, after: M.BusyProfiler(SimpleNamespace(type="cuda"), after, steps=3))
    monkeypatch.setattr(bench.train, "BUSY_AFTER", 0)  # only the warm-up delays the window here
    cfg, task = _listops(tmp_path, monkeypatch, f"train.timing_warmup_steps={warmup}")
    rec = Trainer(cfg, task, Eager(cfg.method_cfg, task), torch.device("cpu"), progress=False, log=lambda s: None).run()
    m = rec.measurements
    assert m["gpu_busy_steps"] == profiled and m["train_steps_timed"] == 40 - warmup - profiled
    assert m["gpu_busy_fraction"] == pytest.approx(0.6) and m["kernel_launches_per_step"] == pytest.approx(2 / profiled)
    assert len(_FakeProfile.made) == 1


def test_window_waits_for_busy_after_steps_and_keeps_its_raw_numbers(tmp_path, monkeypatch, fake_cuda):
    """Early steps of variable-shape tasks build kernel plans per new shape: the window starts at BUSY_AFTER."""
    import bench.train

    monkeypatch.setattr(bench.train, "BusyProfiler",
                        lambda device, after: M.BusyProfiler(SimpleNamespace(type="cuda"), after, steps=3))
    monkeypatch.setattr(bench.train, "BUSY_AFTER", 12)
    cfg, task = _listops(tmp_path, monkeypatch)  # warm-up 5 < 12: the window is steps 12-14 of the phase
    rec = Trainer(cfg, task, Eager(cfg.method_cfg, task), torch.device("cpu"), progress=False, log=lambda s: None).run()
    m = rec.measurements
    assert m["gpu_busy_steps"] == 3 and m["train_steps_timed"] == 40 - 5 - 3
    (window,) = m["gpu_busy_windows"].values()
    assert window["from_step"] == 12 and window["steps"] == 3 and window["wall_ms"] > 0
    assert "from step 12 of the phase" in m["gpu_busy_note"]

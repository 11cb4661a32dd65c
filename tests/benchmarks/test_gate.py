"""The CPU gate survives a busy machine and still catches a real regression.

1. A fake clock drives the gate's own path (``benchmark.pedantic`` with ``cpu_gate.Interleaved``'s hooks,
   ``paired_ratio``, ``judge``): an environment slower by 3x, 5x, 20x or by a load that comes and goes
   round by round (benchmark and calibration of a round slowed alike) passes, where the old absolute rule
   (3x the median + 5 ms) fails from 5x on; a 5x regression of the benchmarked function alone fails, busy or not.
2. Real CPU hogs: two busy-loop subprocesses share this process's CPU (all three pinned to it). Against the
   ratio measured here without them, the gate passes under the hogs and fails for the same function made 5x
   slower under the same hogs. Nothing asserts on wall time; the wall-clock slowdown only goes into messages.
"""
from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

import cpu_gate

BASE_BENCH, BASE_CAL = 0.020, 0.008  # fake CPU seconds: committed ratio 2.5
OLD_TOLERANCE, OLD_SLACK = 3.0, 0.005  # the absolute rule this gate replaced


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _slowdowns(kind: str, rng: random.Random):
    if kind == "bursty":  # another process's load comes and goes between rounds
        while True:
            yield rng.choice([1.0, 1.0, 2.0, 4.0, 8.0])
    while True:
        yield float(kind)


@pytest.mark.benchmark(group="gate-selftest")
@pytest.mark.parametrize("env, regression, passes", [
    ("1", 1, True), ("3", 1, True), ("5", 1, True), ("20", 1, True), ("bursty", 1, True),
    ("1", 5, False), ("3", 5, False), ("bursty", 5, False),
])
def test_gate_with_a_slowed_clock(benchmark, monkeypatch, env, regression, passes):
    clock, rng = FakeClock(), random.Random(0)
    monkeypatch.setattr(cpu_gate, "CLOCK", clock)
    slow = _slowdowns(env, rng)
    factor = [1.0]

    def calibration():  # a new round starts with its calibration: draw this round's load
        factor[0] = next(slow)
        clock.t += BASE_CAL * factor[0] * rng.uniform(0.9, 1.1)

    def fn():
        clock.t += BASE_BENCH * regression * factor[0] * rng.uniform(0.9, 1.1)

    rec = cpu_gate.Interleaved(calibration)
    rounds = rec.plan(fn)
    if benchmark.disabled:  # --benchmark-disable: the same hooks, driven by cpu_gate.measure
        rec = cpu_gate.measure(fn, calibration, rounds)
    else:
        benchmark.pedantic(fn, setup=rec.setup, teardown=rec.teardown, rounds=rounds,
                           warmup_rounds=cpu_gate.WARMUP_ROUNDS)
        assert len(benchmark.stats.stats.data) == rounds
    bench, cal = rec.pairs(rounds)
    assert len(bench) == rounds
    ratio = cpu_gate.paired_ratio(bench, cal)
    verdict = cpu_gate.judge("fake", ratio, BASE_BENCH / BASE_CAL)
    assert (verdict is None) == passes, verdict or f"ratio {ratio:.2f} passed"
    if regression == 1 and env in ("5", "20"):  # the old absolute rule would have failed this busy run
        assert statistics.median(bench) > OLD_TOLERANCE * BASE_BENCH + OLD_SLACK


def test_paired_ratio_and_judge():
    assert cpu_gate.paired_ratio([2.0, 30.0, 4.0], [1.0, 10.0, 1.0]) == 3.0
    assert cpu_gate.judge("x", 2.5 * 4.0, 4.0) is None
    assert "re-baseline" in cpu_gate.judge("x", 2.51 * 4.0, 4.0)
    with pytest.raises(ValueError):
        cpu_gate.paired_ratio([1.0], [])


# ---- 2. real CPU hogs ---------------------------------------------------------------------------------
@contextmanager
def _pinned_with_hogs(n_hogs: int):
    """Pin this process to one CPU and start ``n_hogs`` busy-loop subprocesses pinned to the same CPU."""
    old = os.sched_getaffinity(0)
    cpu = min(old)
    os.sched_setaffinity(0, {cpu})
    hogs = []
    try:
        for _ in range(n_hogs):
            hogs.append(subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n pass"]))
        time.sleep(0.2)
        yield
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait()
        os.sched_setaffinity(0, old)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_gate_under_real_cpu_hogs():
    from bench.attention import eager_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 32, generator=g) for _ in range(3))

    def fn():
        return eager_attention(q, k, v)

    def regressed():  # the same function, 5x the work
        for _ in range(5):
            eager_attention(q, k, v)

    cal = cpu_gate.CALIBRATIONS["tensor-v1"]
    rounds = 8

    def run(f):
        t0 = time.perf_counter()
        rec = cpu_gate.measure(f, cal, rounds)
        return cpu_gate.paired_ratio(*rec.pairs(rounds)), time.perf_counter() - t0

    with _pinned_with_hogs(0):
        quiet, quiet_wall = run(fn)
    with _pinned_with_hogs(2):
        busy, busy_wall = run(fn)
        slow, _ = run(regressed)
    note = (f"quiet ratio {quiet:.3f}, under 2 hogs {busy:.3f} (wall time {busy_wall / quiet_wall:.1f}x), "
            f"5x regression under hogs {slow:.3f}")
    assert cpu_gate.judge("busy", busy, quiet) is None, note
    assert cpu_gate.judge("regressed", slow, quiet) is not None, note

"""Regression gate for the CPU benchmarks (pytest-benchmark), robust to a busy machine.

``gate(fn, calibration)`` runs ``fn`` with ``benchmark.pedantic``; before every round a fixed
calibration workload of similar character runs and is timed (``cpu_gate.Interleaved``). The gate compares
the median per-round ratio *benchmark CPU time / calibration CPU time* with the committed ratio of this kind
of machine (``baselines/<machine>.json``, format ``cpu-ratio-v1``) and fails above ``cpu_gate.TOLERANCE``
x that ratio. Load from other processes slows both sides of each ratio and cancels; a regression of the
benchmarked code alone does not (see cpu_gate.py for why, test_gate.py for the proof). pytest-benchmark's
table still shows the wall-clock rounds; the ratio, the calibration and the CPU medians go into
``extra_info`` (and so into ``--benchmark-json``). Exact work counters are asserted by the tests themselves.

No baseline for this machine: the test passes and the measured ratios are written to
``.benchmarks/candidate-<machine>.json`` (same format; one run). To adopt a baseline, run
``python tests/benchmarks/make_cpu_baseline.py`` (medians of several runs into ``baselines/<machine>.json``).
``SPARSEBENCH_GATE=record`` measures without comparing (what make_cpu_baseline.py uses).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_gate  # noqa: E402

_MEASURED: dict[str, dict] = {}


@pytest.fixture
def gate(benchmark, request):
    """``gate(fn, calibration="tensor-v1")`` -> ``fn()``'s result, timed by pytest-benchmark and gated."""

    def run(fn, calibration="tensor-v1"):
        name = request.node.name
        if benchmark.disabled:  # --benchmark-disable: one plain call, nothing to compare
            return benchmark.pedantic(fn)
        rec = cpu_gate.Interleaved(cpu_gate.CALIBRATIONS[calibration])
        rounds = rec.plan(fn)
        result = benchmark.pedantic(fn, setup=rec.setup, teardown=rec.teardown, rounds=rounds,
                                    warmup_rounds=cpu_gate.WARMUP_ROUNDS)
        b, c = rec.pairs(rounds)
        ratio = cpu_gate.paired_ratio(b, c)
        entry = {"calibration": calibration, "ratio": ratio, "cpu_ms": statistics.median(b) * 1e3,
                 "calibration_cpu_ms": statistics.median(c) * 1e3, "rounds": rounds}
        benchmark.extra_info.update(calibration=calibration, cpu_ratio=ratio, cpu_median_ms=entry["cpu_ms"],
                                    calibration_cpu_median_ms=entry["calibration_cpu_ms"])
        _MEASURED[name] = entry
        if os.environ.get("SPARSEBENCH_GATE") == "record":
            return result
        path = cpu_gate.baseline_path()
        table = cpu_gate.load_baseline(path)
        if table is None:
            if path.exists():
                warnings.warn(f"{path.name} is not in format {cpu_gate.FORMAT}: not gated; re-baseline with "
                              "tests/benchmarks/make_cpu_baseline.py")
            return result
        base = table.get(name)
        if base is None:
            return result
        assert base["calibration"] == calibration, (
            f"{name}: baseline {path.name} is relative to {base['calibration']}, the test now uses {calibration}; "
            "re-baseline with tests/benchmarks/make_cpu_baseline.py")
        failure = cpu_gate.judge(name, ratio, base["ratio"])
        if failure is not None:
            pytest.fail(f"{failure} [{path.name}]")
        return result

    return run


def pytest_sessionfinish(session, exitstatus):
    if not _MEASURED:
        return
    key = cpu_gate.machine_key()
    entries = dict(_MEASURED)
    if os.environ.get("SPARSEBENCH_UPDATE_BASELINE") == "1":  # one run; make_cpu_baseline.py takes medians
        target = cpu_gate.baseline_path(key)
        entries = {**(cpu_gate.load_baseline(target) or {}), **entries}
    else:
        target = Path(session.config.rootpath) / ".benchmarks" / f"candidate-{key}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(cpu_gate.baseline_document(entries, runs=1), indent=1) + "\n")

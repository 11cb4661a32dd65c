"""Regression gate for the CPU benchmarks (pytest-benchmark).

Each benchmark's median is compared with the committed baseline of *this kind of machine*
(``baselines/<machine>.json``, keyed by CPU model and core count, like xformers' per-GPU CSVs). A
benchmark fails only if it is more than ``TOLERANCE``× slower than its baseline plus ``SLACK_MS``: loose
enough for a noisy shared CI box, tight enough to catch an accidental O(L²) or a lost vectorisation.
Deterministic work counters (FLOPs, blocks visited) go into ``extra_info`` and are asserted exactly.

No baseline for this machine: the test passes and the measured medians are written to
``.benchmarks/candidate-<machine>.json``; copy that file into ``baselines/`` to adopt it (or run with
``SPARSEBENCH_UPDATE_BASELINE=1`` to write ``baselines/<machine>.json`` directly).
"""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import pytest

TOLERANCE = 3.0
SLACK_MS = 5.0
HERE = Path(__file__).parent


def machine_key() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-").lower()
    return f"{slug}-{os.cpu_count()}c"


_MEASURED: dict[str, float] = {}


@pytest.fixture
def gate(request):
    """Call ``gate(benchmark)`` after running a benchmark: compares its median with the baseline."""

    def check(benchmark):
        if benchmark.stats is None:  # --benchmark-disable
            return
        name = request.node.name
        median_ms = benchmark.stats.stats.median * 1e3
        _MEASURED[name] = median_ms
        path = HERE / "baselines" / f"{machine_key()}.json"
        if not path.exists():
            return
        base = json.loads(path.read_text()).get(name)
        if base is None:
            return
        limit = TOLERANCE * base + SLACK_MS
        assert median_ms <= limit, (
            f"{name}: median {median_ms:.2f} ms > {TOLERANCE}x baseline {base:.2f} ms + {SLACK_MS} ms "
            f"({path.name}); if the slowdown is intended, refresh the baseline (see tests/benchmarks/conftest.py)"
        )

    return check


def pytest_sessionfinish(session, exitstatus):
    if not _MEASURED:
        return
    key = machine_key()
    if os.environ.get("SPARSEBENCH_UPDATE_BASELINE") == "1":
        target = HERE / "baselines" / f"{key}.json"
    else:
        target = Path(session.config.rootpath) / ".benchmarks" / f"candidate-{key}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(dict(sorted(_MEASURED.items())), indent=1) + "\n")

"""The CPU benchmark gate's measurement and comparison logic (used by conftest.py's ``gate`` fixture,
by test_gate.py's robustness tests and by make_cpu_baseline.py).

What is compared: not absolute times (a busy 2-core box read 3-5x the committed medians) but, per round,
the CPU time of the benchmarked call divided by the CPU time of a fixed *calibration* workload of similar
character (pure torch, no project code) run just before it in the same round of the same process. The
gate takes the median of those per-round ratios and fails if it exceeds ``TOLERANCE`` x the committed
ratio for this kind of machine. Two things make the ratio robust to load:

* ``CLOCK`` is the process's CPU time, so time slices handed to other processes are not counted (with wall
  time, a 2 ms calibration either ran inside one time slice or waited out two: per-round ratios swung 3x);
* whatever still slows this process's own CPU time (a shared SMT core, memory-bandwidth contention, a slower
  or throttled CPU) slows the calibration of that round by about the same factor, and cancels in the ratio.

A genuine regression of the benchmarked function alone moves only the numerator and still fails.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

TOLERANCE = 2.5  # ratio of ratios: run-to-run scatter seen here stays within ~1.5x of the median; 5x fails
FORMAT = "cpu-ratio-v1"
CLOCK: Callable[[], float] = time.process_time  # looked up at each measurement: tests monkeypatch it
TARGET_S = 0.6  # CPU seconds of benchmark + calibration per benchmark
MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 7, 200, 2
HERE = Path(__file__).parent
BASELINES = HERE / "baselines"


# ---- calibration workloads: fixed, seeded, pure torch (no project code, so a project regression cannot move them)
@dataclass
class Calibration:
    name: str  # bump the -vN suffix whenever the workload changes: committed ratios are relative to it
    make: Callable[[], Callable[[], object]]  # builds the inputs once and returns the timed callable
    _fn: Callable[[], object] | None = field(default=None, repr=False)

    def __call__(self):
        if self._fn is None:
            self._fn = self.make()
        return self._fn()


def _tensor_workload():
    """Textbook attention at the benchmarks' shape: two batched matmuls and a softmax over (2, 4, 512, 512)."""
    g = torch.Generator().manual_seed(12345)
    q, k, v = (torch.randn(2, 4, 512, 32, generator=g) for _ in range(3))

    def run():
        s = torch.matmul(q, k.transpose(-1, -2)) * 32 ** -0.5
        return torch.matmul(torch.softmax(s, -1), v)

    return run


def _small_ops_workload():
    """Dispatch-bound: a few dozen small torch ops (counts, cumsum, nonzero, cat, casts) on a bool tensor."""
    g = torch.Generator().manual_seed(54321)
    x = torch.rand(8, 128, 128, generator=g) < 0.1
    pad = torch.zeros(1, dtype=torch.int64)

    def run():
        out = None
        for _ in range(2):
            cnt = x.sum(-1).reshape(-1)
            ptr = torch.zeros(cnt.numel() + 1, dtype=torch.int64)
            ptr[1:] = torch.cumsum(cnt, 0)
            nz = torch.nonzero(x.transpose(1, 2))
            out = (ptr.to(torch.int32), torch.cat([nz[:, 2], pad]).to(torch.int32).contiguous())
        return out

    return run


CALIBRATIONS = {c.name: c for c in (Calibration("tensor-v1", _tensor_workload),
                                    Calibration("small-ops-v1", _small_ops_workload))}


# ---- measurement: one calibration run, then one benchmark call, per round --------------------------------
class Interleaved:
    """``setup``/``teardown`` hooks for ``benchmark.pedantic``: each round first times the calibration, then
    the benchmarked call (from the end of setup to the start of teardown), both with ``CLOCK``."""

    def __init__(self, calibration: Callable[[], object], clock: Callable[[], float] | None = None):
        self.calibration = calibration
        self.clock = clock or CLOCK
        self.cal: list[float] = []
        self.bench: list[float] = []
        self._pending: tuple[float, float] | None = None

    def setup(self):
        c0 = self.clock()
        self.calibration()
        c1 = self.clock()
        self._pending = (c1 - c0, self.clock())

    def teardown(self, *args, **kwargs):
        end = self.clock()
        if self._pending is not None:
            cal, start = self._pending
            self.cal.append(cal)
            self.bench.append(end - start)
            self._pending = None

    def plan(self, fn) -> int:
        """Rounds for about TARGET_S CPU seconds, from one probe round (which also warms both up)."""
        self.setup()
        fn()
        self.teardown()
        per_round = self.cal.pop() + self.bench.pop()
        return max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / max(per_round, 1e-9))))

    def pairs(self, rounds: int) -> tuple[list[float], list[float]]:
        """The last ``rounds`` (bench, calibration) pairs: warmup rounds come first and are dropped."""
        return self.bench[-rounds:], self.cal[-rounds:]


def measure(fn, calibration, rounds: int, warmup: int = WARMUP_ROUNDS, clock=None) -> Interleaved:
    """The protocol ``benchmark.pedantic(fn, setup=..., teardown=...)`` runs, without pytest-benchmark."""
    rec = Interleaved(calibration, clock)
    for _ in range(warmup + rounds):
        rec.setup()
        fn()
        rec.teardown()
    return rec


def paired_ratio(bench: list[float], cal: list[float]) -> float:
    """Median over rounds of benchmark time / calibration time of the same round."""
    if not bench or len(bench) != len(cal):
        raise ValueError(f"need matching non-empty round lists, got {len(bench)} and {len(cal)}")
    return statistics.median(b / max(c, 1e-12) for b, c in zip(bench, cal))


def judge(name: str, ratio: float, base_ratio: float, tolerance: float = TOLERANCE) -> str | None:
    """None if ``ratio`` is within ``tolerance`` x the committed ratio, else the failure message."""
    if ratio <= tolerance * base_ratio:
        return None
    return (f"{name}: {ratio:.3f}x its calibration workload > {tolerance}x the committed {base_ratio:.3f}x "
            f"({ratio / base_ratio:.2f}x slower relative to the calibration, measured in this process); if the "
            f"slowdown is intended, re-baseline with `python tests/benchmarks/make_cpu_baseline.py`")


# ---- baselines --------------------------------------------------------------------------------------------
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


def baseline_path(key: str | None = None) -> Path:
    return BASELINES / f"{key or machine_key()}.json"


def load_baseline(path: Path) -> dict | None:
    """The ``benchmarks`` table of a ``cpu-ratio-v1`` file; None if absent or in another (older) format."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data["benchmarks"]


def baseline_document(entries: dict[str, dict], runs: int) -> dict:
    return {
        "format": FORMAT,
        "machine": machine_key(),
        "clock": f"{CLOCK.__module__}.{CLOCK.__name__}",
        "compares": "median over rounds of benchmark CPU time / calibration CPU time of the same round; "
                    f"fails above {TOLERANCE}x 'ratio'",
        "runs": runs,
        "torch": torch.__version__,
        "benchmarks": dict(sorted(entries.items())),
    }

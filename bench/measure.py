"""Timing and memory measurement that is honest on both CUDA and CPU.

CUDA: events around each step, read back only at sync points (a per-step synchronize would inflate fast
steps), warm-up steps excluded, peak memory as the ``max_memory_allocated`` delta over what was allocated
before the first step: the model and data already resident are not counted; gradients, activations and the
optimizer state (AdamW creates it lazily in the first step) are. Methods that change attention during training
(SPION) get one peak per phase: the peak statistics restart at each phase change.
CPU: ``perf_counter`` around each step (the step ends with the optimizer update, which is synchronous);
memory is not measured (reported as None, and the report prints "n/m").
GPU-busy fraction (``BusyProfiler``, CUDA only): once per phase, after its timing warm-up and ``BUSY_AFTER`` steps, a few training
steps (``BUSY_STEPS``) run under ``torch.profiler`` (CUDA activity only) and are left out of the step-time
statistics; busy = the union of the device intervals of the kernels, memcpys and memsets in that window, wall = host
clock from a synchronize before the first step's forward to one before the next step's (batch fetch and method
hooks included; the window closes before any eval). ``gpu_busy_fraction`` = busy / wall, ``kernel_launches_per_step`` = kernels run
per step. CPU: both None ("not measured").
"""
from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict

import torch

BUSY_STEPS = int(os.environ.get("SPARSEBENCH_BUSY_STEPS", "3"))  # steps profiled per phase; 0 disables
# The Trainer profiles no earlier than this many steps into a phase: tasks with a new batch shape every step
# (MT's length buckets) build cuDNN/cuBLAS plans per new shape for the first tens of steps, which a window at the
# timing warm-up's end measured as host time (Multi30k: 0.005 busy at steps 5-7 while the median step is 36 ms).
BUSY_AFTER = int(os.environ.get("SPARSEBENCH_BUSY_AFTER", "50"))
DEVICE_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")  # kineto activity types that keep the GPU busy


def interval_union_ns(intervals) -> int:
    """Total length covered by ``(start, end)`` intervals (overlaps counted once; empty or reversed ones ignored)."""
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted((s, e) for s, e in intervals if e > s):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0)


def device_activity(events) -> tuple[int, int]:
    """(busy ns, kernels) of ``(kind, start_ns, end_ns)`` device events: the union of the kernel, memcpy and memset
    intervals (other kinds, e.g. GPU-side annotations spanning idle time, are ignored) and the number of kernels."""
    busy = [(s, e) for kind, s, e in events if kind in DEVICE_KINDS]
    return interval_union_ns(busy), sum(1 for kind, _, _ in events if kind == "kernel")


def _kineto_device_events(prof) -> list[tuple[str, int, int]]:
    """``(kind, start_ns, end_ns)`` of the CUDA-side events a ``torch.profiler.profile`` recorded."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != DeviceType.CUDA:
            continue
        kind = e.activity_type() if hasattr(e, "activity_type") else None
        if kind is None:  # older torch: classify by name
            name = e.name()
            kind = "gpu_memcpy" if name.startswith("Memcpy") else "gpu_memset" if name.startswith("Memset") else "kernel"
        start = e.start_ns()
        end = e.end_ns() if hasattr(e, "end_ns") else start + e.duration_ns()
        out.append((str(kind), int(start), int(end)))
    return out


class BusyProfiler:
    """The GPU-busy fraction of a few training steps per phase (see the module docstring). The Trainer asks
    ``profiling(phase)`` before each step (True: profile it and do not time it), calls ``step_done()`` after it and
    ``close()`` before an eval and at a stage's end. A window of K steps spans K whole loop iterations (from before
    the first step's forward to before the (K+1)-th's), shorter if an eval or the stage's end comes first."""

    def __init__(self, device: torch.device, after_steps: int, steps: int | None = None):
        self.steps = BUSY_STEPS if steps is None else steps
        self.enabled = device.type == "cuda" and self.steps > 0
        self.after = after_steps
        self._seen: dict[str, int] = defaultdict(int)
        self.by_phase: dict[str, dict] = {}  # phase -> {busy_ms, wall_ms, kernels, steps} or {error}
        self._active: dict | None = None

    def profiling(self, phase: str) -> bool:
        if not self.enabled:
            return False
        if self._active is not None:  # the window is K whole loop iterations: it closes when step K+1 begins
            if self._active["phase"] == phase and self._active["steps"] < self.steps:
                return True
            self.close()
        self._seen[phase] += 1
        if phase in self.by_phase or self._seen[phase] <= self.after:
            return False
        try:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.start()
        except Exception as e:  # a measurement never stops a run
            self.by_phase[phase] = {"error": f"{type(e).__name__}: {e}"[:200]}
            return False
        self._active = {"phase": phase, "prof": prof, "steps": 0, "t0": time.perf_counter_ns(),
                        "from_step": self._seen[phase] - 1}
        return True

    def step_done(self) -> None:
        if self._active is not None:
            self._active["steps"] += 1

    def close(self) -> None:
        a, self._active = self._active, None
        if a is None:
            return
        try:
            torch.cuda.synchronize()
            wall_ns = time.perf_counter_ns() - a["t0"]
            a["prof"].stop()
            busy_ns, kernels = device_activity(_kineto_device_events(a["prof"]))
            if not kernels:  # a step always runs kernels: the profiler did not see the device
                raise RuntimeError(f"the profiler recorded no device kernel in {a['steps']} steps")
            self.by_phase[a["phase"]] = {"busy_ms": busy_ns / 1e6, "wall_ms": wall_ns / 1e6, "kernels": kernels,
                                         "steps": a["steps"], "from_step": a["from_step"]}
        except Exception as e:
            self.by_phase[a["phase"]] = {"error": f"{type(e).__name__}: {e}"[:200]}

    def summary(self) -> dict:
        self.close()
        if not self.enabled:
            return {"gpu_busy_fraction": None, "kernel_launches_per_step": None,
                    "gpu_busy_note": "not measured" + (" on CPU" if self.steps > 0 else " (SPARSEBENCH_BUSY_STEPS=0)")}
        ok = {p: d for p, d in sorted(self.by_phase.items()) if "error" not in d and d["steps"] and d["wall_ms"] > 0}
        out: dict = {"gpu_busy_fraction": None, "kernel_launches_per_step": None}
        if ok:
            steps = sum(d["steps"] for d in ok.values())
            out["gpu_busy_fraction"] = sum(d["busy_ms"] for d in ok.values()) / sum(d["wall_ms"] for d in ok.values())
            out["kernel_launches_per_step"] = sum(d["kernels"] for d in ok.values()) / steps
            out["gpu_busy_steps"] = steps
            out["gpu_busy_windows"] = ok  # raw per-phase windows (busy/wall ms, kernels, steps, first step of the phase)
        if len(ok) > 1:
            out["gpu_busy_fraction_by_phase"] = {p: d["busy_ms"] / d["wall_ms"] for p, d in ok.items()}
            out["kernel_launches_per_step_by_phase"] = {p: d["kernels"] / d["steps"] for p, d in ok.items()}
        errors = {p: d["error"] for p, d in sorted(self.by_phase.items()) if "error" in d}
        out["gpu_busy_note"] = ("union of kernel/memcpy/memset device intervals over host wall time of "
                                f"{self.steps} profiled steps per phase, from step {self.after} of the phase on (torch.profiler, "
                                "CUDA activity; these steps are not in the step-time statistics)")
        if errors:
            out["gpu_busy_errors"] = errors
        if not ok:
            out["gpu_busy_note"] = "not measured: " + ("; ".join(f"{p}: {e}" for p, e in errors.items())
                                                       or "no phase ran past its timing warm-up")
        return out


class StepTimer:
    def __init__(self, device: torch.device, warmup_steps: int):
        self.cuda = device.type == "cuda"
        self.warmup = warmup_steps
        self._pending: list[tuple[str, object, object]] = []
        self.times_ms: dict[str, list[float]] = defaultdict(list)
        self._seen: dict[str, int] = defaultdict(int)

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, handle, phase: str = "train") -> None:
        self._seen[phase] += 1
        if self._seen[phase] <= self.warmup:  # first steps of every phase compile/autotune
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((phase, handle, end))
        else:
            self.times_ms[phase].append((time.perf_counter() - handle) * 1e3)

    def flush(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            for phase, s, e in self._pending:
                self.times_ms[phase].append(s.elapsed_time(e))
            self._pending.clear()

    def summary(self) -> dict:
        self.flush()
        out = {}
        all_times = [t for ts in self.times_ms.values() for t in ts]
        if all_times:
            out["train_step_ms_median"] = statistics.median(all_times)
            out["train_step_ms_mean"] = statistics.fmean(all_times)
            out["train_steps_timed"] = len(all_times)
        if len(self.times_ms) > 1 or (self.times_ms and "train" not in self.times_ms):
            out["train_step_ms_median_by_phase"] = {p: statistics.median(t) for p, t in sorted(self.times_ms.items()) if t}
            out["train_steps_timed_by_phase"] = {p: len(t) for p, t in sorted(self.times_ms.items())}
        return out


class PeakMemory:
    def __init__(self, device: torch.device, phase: str = "train"):
        self.cuda = device.type == "cuda"
        self.base = 0
        self.phase = phase
        self.by_phase: dict[str, float] = {}

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def _peak(self) -> float:
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20

    def set_phase(self, phase: str) -> None:
        """Close the current phase's peak (MiB over the pre-training base) and start measuring the next one."""
        if phase == self.phase:
            return
        if self.cuda:
            torch.cuda.synchronize()
            self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0.0), self._peak())
            torch.cuda.reset_peak_memory_stats()
        self.phase = phase

    def summary(self) -> dict:
        if not self.cuda:
            return {"peak_mem_mib": None, "peak_mem_note": "not measured on CPU"}
        torch.cuda.synchronize()
        by_phase = {**self.by_phase, self.phase: max(self.by_phase.get(self.phase, 0.0), self._peak())}
        out = {
            "peak_mem_mib": max(by_phase.values()),
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
            "resident_before_mib": self.base / 2**20,
            "peak_mem_note": "max_memory_allocated minus memory allocated before the first step (includes "
                             "gradients and optimizer state)",
        }
        if len(by_phase) > 1:
            out["peak_mem_mib_by_phase"] = dict(sorted(by_phase.items()))
        return out


def time_inference(fn, batches: list, device: torch.device, n_tokens: list[int], n_seqs: list[int]) -> dict:
    """Run ``fn(batch)`` once per batch for warm-up (every batch shape may compile or plan anew), then time one
    more pass over all batches."""
    if not batches:
        return {}
    with torch.no_grad():
        for b in batches:
            fn(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for b in batches:
                fn(b)
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e)
        else:
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            ms = (time.perf_counter() - t0) * 1e3
    return {
        "infer_tokens_per_s": sum(n_tokens) / (ms / 1e3),
        "infer_seqs_per_s": sum(n_seqs) / (ms / 1e3),
        "infer_batches_timed": len(batches),
    }

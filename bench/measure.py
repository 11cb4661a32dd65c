"""Timing and memory measurement that is honest on both CUDA and CPU.

CUDA: events around each step, read back only at sync points (a per-step synchronize would inflate fast
steps), warm-up steps excluded, peak memory as the ``max_memory_allocated`` delta over what was allocated
before the first step: the model and data already resident are not counted; gradients, activations and the
optimizer state (AdamW creates it lazily in the first step) are. Methods that change attention during training
(SPION) get one peak per phase: the peak statistics restart at each phase change.
CPU: ``perf_counter`` around each step (the step ends with the optimizer update, which is synchronous);
memory is not measured (reported as None, and the report prints "n/m").
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch


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

"""Timing and memory measurement that is honest on both CUDA and CPU.

CUDA: events around each step, read back only at sync points (a per-step synchronize would inflate fast
steps), warm-up steps excluded, peak memory as the ``max_memory_allocated`` delta over what was allocated
before the first step (model, optimizer state and data already resident are not counted).
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
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def summary(self) -> dict:
        if not self.cuda:
            return {"peak_mem_mib": None, "peak_mem_note": "not measured on CPU"}
        torch.cuda.synchronize()
        return {
            "peak_mem_mib": (torch.cuda.max_memory_allocated() - self.base) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
            "resident_before_mib": self.base / 2**20,
            "peak_mem_note": "max_memory_allocated minus memory allocated before the first step",
        }


def time_inference(fn, batches: list, device: torch.device, n_tokens: list[int], n_seqs: list[int]) -> dict:
    """Run ``fn(batch)`` once per batch for warm-up, then time one more pass over all batches."""
    if not batches:
        return {}
    with torch.no_grad():
        fn(batches[0])
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

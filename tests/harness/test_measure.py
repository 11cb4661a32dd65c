"""bench/measure.py and the Trainer's best-checkpoint rule, on CPU (CUDA calls faked where needed)."""
import math

import torch

from bench.measure import PeakMemory, time_inference
from bench.train import is_better


def test_a_nan_dev_score_never_becomes_the_best():
    assert not is_better(math.nan, None, True)
    assert is_better(0.1, math.nan, True) and is_better(5.0, math.inf, False)  # finite beats a non-finite best
    assert is_better(2.0, 1.0, True) and not is_better(2.0, 1.0, False) and not is_better(1.0, 1.0, True)


def test_peak_memory_is_kept_per_phase(monkeypatch):
    state = {"alloc": 100 * 2**20, "peak": 100 * 2**20}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 2 * state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["alloc"]))
    mem = PeakMemory(torch.device("cuda"), phase="dense")
    mem.reset()  # base: 100 MiB resident
    state["peak"] = 400 * 2**20  # dense phase peaks 300 MiB over the base
    mem.set_phase("dense")  # no change: nothing closed
    mem.set_phase("sparse")
    state["peak"] = 250 * 2**20  # sparse phase peaks 150 MiB over the base
    out = mem.summary()
    assert out["peak_mem_mib_by_phase"] == {"dense": 300.0, "sparse": 150.0}
    assert out["peak_mem_mib"] == 300.0 and out["resident_before_mib"] == 100.0


def test_inference_warms_up_on_every_batch_shape():
    calls = []
    out = time_inference(lambda b: calls.append(b), [1, 2, 3], torch.device("cpu"), [10, 20, 30], [1, 1, 1])
    assert calls[:3] == [1, 2, 3] and calls[3:] == [1, 2, 3]  # one warm-up pass over all shapes, then the timed one
    assert out

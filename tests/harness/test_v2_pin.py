"""Harness v2 changes nothing for the methods it ported: the `tiny` runs of dense, eager, the four fixed patterns,
SPION (C, F, CF) and the dense baselines of WikiText-2, Multi30k and SST-2 give the metrics and training-loss
histories pinned in golden_v1.json, captured on the code before the port (same seed, CPU)."""
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # ~100 s; CI runs it (-m slow)

from bench.cli import build_run_config, parse_method_spec, run_one

GOLDEN = json.loads((Path(__file__).parent / "golden_v1.json").read_text())
ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_tiny_runs_match_the_pre_v2_harness(key, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSEBENCH_ARTIFACTS", str(tmp_path / "artifacts"))
    task, method = key.split("/")
    data_dir, ov = GOLDEN[key]["data_dir"], GOLDEN[key]["overrides"]
    data_dir = None if data_dir is None else str(ROOT / data_dir)
    spec = parse_method_spec(method)
    cfg = build_run_config(task, spec, "tiny", 0, "cpu", ov)
    rec = run_one(task, spec, 0, cfg, torch.device("cpu"), data_dir, "tiny", False, ov)
    want = GOLDEN[key]
    got_m = {k: v for k, v in rec.metrics.items() if k in want["metrics"]}
    assert set(got_m) == set(want["metrics"])
    for k, v in want["metrics"].items():
        assert math.isclose(got_m[k], v, rel_tol=1e-6, abs_tol=1e-9), (k, got_m[k], v)
    got_l = [h["train_loss"] for h in rec.history]
    assert len(got_l) == len(want["train_loss"])
    for a, b in zip(got_l, want["train_loss"]):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)

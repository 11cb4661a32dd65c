"""kernels/benchmark.py on CPU at toy sizes: the generic grid and SPION record layouts (numbers meaningless)."""
import json

import torch

from bench.config import apply_overrides_to
from kernels.benchmark import PRESETS, run_sweep


def _record(path, layouts, block=16):
    rec = {"task": "lra_text", "method": "spion_cf", "seed": 0, "config_hash": "abc",
           "config": {"model": {"n_heads": 2, "d_model": 32, "d_qkv": 32}, "train": {"batch_size": 1}},
           "method_info": {"block_size": block, "layouts": layouts}}
    path.write_text(json.dumps(rec))
    return str(path)


def test_tiny_grid_rows_are_checked_and_timed():
    rows = run_sweep(PRESETS["tiny"], torch.device("cpu"), log=lambda s: None)
    kinds = {(r["kernel"], r["pattern"]) for r in rows}
    assert ("sdpa_math", "dense") in kinds and ("block_sparse_torch", "random") in kinds
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)


def test_record_layouts_time_spion_and_equal_density_patterns(tmp_path):
    lay0 = [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # nb=4 -> L=64 at block 16
    lay1 = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]]
    path = _record(tmp_path / "r.json", [lay0, lay1])
    cfg = apply_overrides_to(PRESETS["tiny"], [f"record_layouts={path}", "lengths=", "patterns=random,local"], "sweep")
    assert cfg.lengths == () and cfg.record_layouts == (path,)
    rows = run_sweep(cfg, torch.device("cpu"), log=lambda s: None)
    by = {r["pattern"]: r for r in rows if r["kernel"] == "block_sparse_torch"}
    assert set(by) == {"spion_layer0", "random@spion_layer0", "local@spion_layer0",
                       "spion_layer1", "random@spion_layer1", "local@spion_layer1"}
    assert by["spion_layer0"]["density"] == 5 / 16 and by["spion_layer1"]["density"] == 7 / 16
    r = by["spion_layer0"]
    assert (r["B"], r["H"], r["L"], r["D"], r["block_size"]) == (1, 2, 64, 16, 16)
    assert r["source_record"] == "lra_text/spion_cf/s0/abc"
    assert any(x["kernel"] == "sdpa_math" for x in rows)  # the dense reference at the same shape


def test_record_without_layouts_is_a_clear_error(tmp_path):
    import pytest

    path = _record(tmp_path / "r.json", [])
    cfg = apply_overrides_to(PRESETS["tiny"], [f"record_layouts={path}", "lengths="], "sweep")
    with pytest.raises(ValueError, match="holds no method_info.layouts"):
        run_sweep(cfg, torch.device("cpu"), log=lambda s: None)


def test_record_layouts_render_in_the_kernels_report(tmp_path):
    from bench.records import record_filename, write_record
    from bench.report import render_reports
    from tasks.kernel_sweep import KernelSweep

    path = _record(tmp_path / "r.json", [[[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]])
    task = KernelSweep("tiny", 0, torch.device("cpu"), overrides=[f"sweep.record_layouts={path}", "sweep.lengths="])
    rec = task.run()
    write_record(rec, tmp_path / "results" / "kernels" / record_filename("kernel_sweep", "k", "tiny", 0, rec.config_hash))
    render_reports(tmp_path / "results", tmp_path / "rep")
    md = (tmp_path / "rep" / "kernels.md").read_text()
    assert "Learned layouts of run `lra_text/spion_cf/s0/abc`" in md and "random@spion_layer0" in md

"""tasks/moe_ffn_sweep.py on CPU at toy sizes (the record, its overrides, its file name) and its section of the
kernels report from a synthetic GPU record (numbers invented, keys those of ``kernels.moe_ffn.run_sweep``)."""
import contextlib
import io
import json

import pytest
import torch

from bench.config import to_dict
from bench.errors import BenchError
from bench.records import RunRecord, read_record, write_record
from bench.report import render_reports
from kernels.moe_ffn import PRESETS


def _cli(*args):
    from bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_tiny_run_writes_a_record_with_rows_and_config(tmp_path):
    rc, out, err = _cli("--suite", "kernels", "--tasks", "moe_ffn_sweep", "--scale", "tiny", "--device", "cpu",
                        "--out", str(tmp_path), "--no-progress")
    assert rc == 0, err
    (path,) = (tmp_path / "kernels").glob("*.json")
    assert path.name.startswith("moe_ffn_sweep__tiny__s0__") and len(path.stem.rsplit("__", 1)[1]) == 10
    rec = read_record(path)
    assert rec["kind"] == "moe_ffn_sweep" and rec["task"] == "moe_ffn_sweep" and rec["seed"] == 0
    assert rec["config"]["sweep"] == json.loads(json.dumps(to_dict(PRESETS["tiny"])))
    assert rec["git"].get("commit") and rec["env"]["gpu"] is None and rec["wall_time_s"] > 0
    rows = rec["measurements"]["rows"]
    assert {r["kernel"] for r in rows} == {"dense", "moe_torch"}
    assert all(r["ms"] > 0 for r in rows) and "not a performance number" in rec["measurements"]["timing"]


def test_sweep_overrides_reach_the_config_and_stay_with_their_sweep(tmp_path):
    from bench import registry
    from bench.cli import sweep_overrides
    from tasks.moe_ffn_sweep import MoEFFNSweep

    task = MoEFFNSweep("tiny", 0, torch.device("cpu"), overrides=["sweep.tokens=2,8", "sweep.models=m:8:16"])
    assert task.cfg.tokens == (2, 8) and task.cfg.models == (("m", 8, 16),)
    assert task.cfg.kernels == ("dense", "moe_torch")  # the rest is the tiny preset's
    rec = task.run()
    assert rec.config["sweep"]["tokens"] == [2, 8] and {r["T"] for r in rec.measurements["rows"]} == {2, 8}
    with pytest.raises(BenchError, match="sweep.models"):
        MoEFFNSweep("tiny", 0, torch.device("cpu"), overrides=["sweep.models=bert-base"])
    # --suite kernels: a field goes to the sweep whose grid has it; <task>.sweep.<field>= to that task alone
    over = ["sweep.tokens=4", "sweep.lengths=256", "moe_ffn_sweep.sweep.fractions=0.25"]
    assert sweep_overrides(registry.get_task("moe_ffn_sweep"), "moe_ffn_sweep", over) == \
        ["sweep.tokens=4", "sweep.fractions=0.25"]
    assert sweep_overrides(registry.get_task("kernel_sweep"), "kernel_sweep", over[1:2]) == ["sweep.lengths=256"]
    rc, out, _ = _cli("--suite", "kernels", "--dry-run", "--scale", "tiny", "--device", "cpu", "--out", str(tmp_path),
                      "sweep.lengths=256")
    assert rc == 0 and "moe_ffn_sweep__tiny__s0__" in out and "kernel_sweep__tiny__s0__" in out
    rc, _, err = _cli("--suite", "kernels", "--tasks", "moe_ffn_sweep", "--scale", "tiny", "--device", "cpu",
                      "--out", str(tmp_path), "sweep.token=4")
    assert rc == 2 and "none of the selected sweeps has a field 'token'" in err
    assert not list(tmp_path.rglob("*.json"))


H200 = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "cpu": "x86_64"}


def _moe_record(env, scale="small"):
    """One model, d_e in {24, 96}, T in {1, 4096, 32768}, f in {0.1, 0.5}: moe_triton (eager and graph), grouped_mm
    (one point skipped) and pairs, with speedups chosen so that each break-even case shows."""
    rows, base = [], dict(model="bert-base", d_model=768, d_ff=3072, dtype="bfloat16")
    eager = {24: {1: (0.3, 0.2), 4096: (0.9, 0.5), 32768: (1.3, 0.6)},  # d_e -> T -> speedup at f = 0.1, 0.5
             96: {1: (0.4, 0.3), 4096: (1.2, 0.8), 32768: (1.7, 1.05)}}
    for T in (1, 4096, 32768):
        rows.append({**base, "T": T, "kernel": "dense_cublas", "d_e": None, "E": None, "fraction_target": 1.0,
                     "ms": 0.5 * T / 32768 + 0.01, "graph_ms": 0.5 * T / 32768 + 0.005, "speedup_vs_dense": 1.0})
        for de in (24, 96):
            for i, f in enumerate((0.1, 0.5)):
                s = eager[de][T][i]
                pt = {**base, "T": T, "d_e": de, "E": 3072 // de, "fraction_target": f, "fraction": f + 0.001}
                rows.append({**pt, "kernel": "moe_triton", "ms": 1.0 / s, "speedup_vs_dense": s,
                             "graph_ms": 0.8 / s, "graph_speedup_vs_dense": s * 1.25 if de == 96 else s * 0.5})
                rows.append({**pt, "kernel": "moe_triton_pairs", "ms": 2.0 / s, "speedup_vs_dense": s / 2,
                             "graph_ms": None, "graph_speedup_vs_dense": None})
                if T == 32768 and f == 0.5:
                    rows.append({**pt, "kernel": "grouped_mm", "skipped": "per-pair outputs 2.3 GiB > max_partial_gib"})
                else:
                    rows.append({**pt, "kernel": "grouped_mm", "ms": 3.0, "speedup_vs_dense": 0.25 + 0.1 * i,
                                 "graph_ms": None, "graph_speedup_vs_dense": None})
    timing = ("triton.testing.do_bench median" if env.get("gpu")
              else "perf_counter median of 3 (CPU, toy sizes: not a performance number)")
    return RunRecord(kind="moe_ffn_sweep", task="moe_ffn_sweep", method="moe_ffn_triton", scale=scale, seed=0,
                     config={"sweep": {}}, config_hash="m0", metrics={}, higher_is_better={},
                     measurements={"rows": rows, "timing": timing}, budget={"main_metric": "", "reduced": False},
                     method_info={"family": "ffn_sparsity"}, env=env, git={"commit": "0123456789abcdef", "dirty": False},
                     date="2025-01-01T00:00:00+00:00", wall_time_s=1.0)


def _cells(md, first, second):
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == [first, second]:
            return cells
    raise AssertionError(f"no row {first!r} {second!r}")


def test_report_renders_the_speedup_table_and_break_even(tmp_path):
    results = tmp_path / "results"
    write_record(_moe_record(H200), results / "kernels" / "moe_ffn_sweep__small__s0__m0.json")
    write_record(_moe_record({**H200, "gpu": None}, scale="tiny"), results / "kernels" / "moe_ffn_sweep__tiny__s0__m1.json")
    render_reports(results, tmp_path / "r1")
    render_reports(results, tmp_path / "r2")
    md = (tmp_path / "r1" / "kernels.md").read_text(encoding="utf-8")
    assert md == (tmp_path / "r2" / "kernels.md").read_text(encoding="utf-8")  # byte-deterministic
    gpu = md[md.index("### MoE FFN: NVIDIA H200, bfloat16, small"):md.index("### MoE FFN: CPU")]
    d24 = gpu[gpu.index("#### bert-base (d_model = 768, d_ff = 3072), d_e = 24 (128 experts)"):gpu.index("d_e = 96")]
    assert _cells(d24, "moe_triton (plain / graph)", "32768") == [
        "moe_triton (plain / graph)", "32768", "0.510 / 0.505", "1.30× / 0.65×", "0.60× / 0.30×"]
    assert _cells(d24, "grouped_mm", "32768")[3:] == ["0.25×", "skip"]
    # d_e = 24: graph speedups (the sentence's) never exceed 1; d_e = 96: f = 0.1 from T = 4096, f = 0.5 from 32768
    assert ("**bert-base, d_e = 24** (`moe_triton`, CUDA graph): the FLOP saving never becomes a wall-clock saving in "
            "this grid (best 0.65× at T = 32768, f = 0.1); plain calls: f = 0.1 from T = 32768; never at f = 0.5.") in d24
    assert ("**bert-base, d_e = 96** (`moe_triton`, CUDA graph): the FLOP saving becomes a wall-clock saving "
            "(speedup > 1) at f = 0.1 from T = 4096; f = 0.5 from T = 32768 (best 2.12× at T = 32768, f = 0.1).\n") in gpu
    assert "`moe_triton_pairs` best 0.65× at T = 32768, f = 0.1 (plain calls)" in d24
    assert "`grouped_mm` skipped at 1 point(s) (per-pair outputs 2.3 GiB > max_partial_gib)" in d24
    cpu = md[md.index("### MoE FFN: CPU, bfloat16, tiny"):md.index("## Environment")]
    assert "they are not performance numbers" in cpu and "not a performance number" in md
    assert "performance numbers" not in gpu

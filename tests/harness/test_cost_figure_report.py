"""The quality-vs-cost figure in the rendered report (bench/report.py + bench/cost_figure.py), on synthetic records
written into tmp_path (never results/ or reports/)."""
from __future__ import annotations

import pytest

from bench.records import RunRecord, record_filename, write_record
from bench.report import render_reports

ENV = {"gpu": None, "torch": "2.11.0", "triton": None, "cuda": None, "cpu": "x86_64"}
FIG = "lra_small_lra_listops_quality_vs_cost"


def _rec(task, method, seed, acc, family, cost=None, ops=None, stages=None):
    return RunRecord(
        kind="run", task=task, method=method, scale="small", seed=seed, config={"model": {"max_len": 64}},
        config_hash=f"h{method}{seed}", metrics={"accuracy": acc, "dev_accuracy": acc + 1},
        higher_is_better={"accuracy": True, "dev_accuracy": True},
        measurements={"train_step_ms_median": 10.0, "infer_tokens_per_s": 100.0, "peak_mem_mib": 50.0},
        budget={"main_metric": "accuracy", "steps_run": 10, "reduced": False}, method_info={"family": family},
        env=ENV, git={"commit": "0123456789abcdef", "dirty": False}, date="2025-01-01T00:00:00+00:00",
        wall_time_s=1.0, cost=None if cost is None else {"flops_per_token": cost}, operating_points=ops,
        stages=stages)


def _op(tau, acc, cost):
    return {"stage": "sweep", "point": {"tau": tau}, "metrics": {"test_accuracy": acc},
            "facts": {}, "cost": {"flops_per_token": cost}}


RECORDS = [
    _rec("lra_listops", "dense", 0, 40.0, "dense", cost=2e6),
    _rec("lra_listops", "dense", 1, 42.0, "dense", cost=2e6),
    # the cost of the last stage that has one; a sweep of three operating points
    _rec("lra_listops", "toy_pruned", 0, 39.0, "learned_pattern",
         stages=[{"name": "dense", "cost": {"flops_per_token": 2e6}}, {"name": "prune", "cost": {"flops_per_token": 1e6}}],
         ops=[_op(0.9, 35.0, 5e5), _op(0.5, 38.0, 1e6), _op(0.1, 41.0, 1.5e6)]),
    _rec("lra_listops", "toy_window", 0, 30.0, "fixed_pattern"),  # no cost facts: left out, with a note
    _rec("lra_text", "dense", 0, 60.0, "dense"),  # a task without any cost facts: no section
    _rec("lra_text", "toy_window", 0, 55.0, "fixed_pattern"),
]


def _write(results, recs):
    for r in recs:
        write_record(r, results / "lra" / record_filename(r.task, r.method, r.scale, r.seed, r.config_hash))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cost_report")
    _write(tmp / "results", RECORDS)
    first = render_reports(tmp / "results", tmp / "r1", {})
    second = render_reports(tmp / "results", tmp / "r2", {})
    return tmp, first, second


def _section(md):
    return md.split("### Quality vs cost")[1].split("## Environment")[0]


def _row(text, first, third):
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first and cells[2] == third:
            return cells
    raise AssertionError(f"no row {first!r} / {third!r}")


def test_figure_written_and_linked(rendered):
    tmp, first, _ = rendered
    fig = tmp / "r1" / "figures"
    for ext in ("png", "svg"):
        assert (fig / f"{FIG}.{ext}").exists() and fig / f"{FIG}.{ext}" in first
    assert (fig / f"{FIG}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp / "r1" / "lra.md").read_text(encoding="utf-8")
    assert md.count("### Quality vs cost") == 1
    sec = _section(md)
    assert f"![{FIG}](figures/{FIG}.png)" in sec and "#### lra_listops" in sec


def test_table_has_every_point(rendered):
    tmp, _, _ = rendered
    sec = _section((tmp / "r1" / "lra.md").read_text(encoding="utf-8"))
    assert "accuracy ↑" in sec and "Dense reference: **dense** (0.00200 GFLOPs per token)" in sec
    assert _row(sec, "dense", "run")[1:] == ["dense", "run", "0.00200", "1.00×", "41.00 ± 1.41 (2)"]
    assert _row(sec, "toy_pruned", "run")[1:] == ["learned_pattern", "run", "0.00100", "0.50×", "39.00 (1)"]
    for tau, gflops, rel, acc in (("0.9", "0.000500", "0.25×", "35.00"), ("0.5", "0.00100", "0.50×", "38.00"),
                                  ("0.1", "0.00150", "0.75×", "41.00")):
        assert _row(sec, "toy_pruned", f"tau={tau}")[3:] == [gflops, rel, f"{acc} (1)"]
    rows = [line for line in sec.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 5  # 2 run points + 3 operating points; the method without a cost has no row
    assert "lra_listops / toy_window / seed 0: no cost in the record" in sec


def test_task_without_cost_facts_gets_no_section(rendered):
    tmp, first, _ = rendered
    sec = _section((tmp / "r1" / "lra.md").read_text(encoding="utf-8"))
    assert "lra_text" not in sec
    assert not any("quality_vs_cost" in p.name and "lra_text" in p.name for p in first)


def test_rerender_is_byte_identical(rendered):
    tmp, first, second = rendered
    assert [p.relative_to(tmp / "r1") for p in first] == [p.relative_to(tmp / "r2") for p in second]
    for p in first:
        if p.suffix in (".md", ".svg") or "quality_vs_cost" in p.name:
            assert p.read_bytes() == (tmp / "r2" / p.relative_to(tmp / "r1")).read_bytes(), p.name


def test_records_without_cost_render_as_before(tmp_path):
    _write(tmp_path / "results", [r for r in RECORDS if r.cost is None and not r.stages])
    written = render_reports(tmp_path / "results", tmp_path / "rep", {})
    assert "Quality vs cost" not in (tmp_path / "rep" / "lra.md").read_text(encoding="utf-8")
    assert not any("quality_vs_cost" in p.name for p in written)
    assert not list((tmp_path / "rep" / "figures").glob("*quality_vs_cost*"))


def test_operating_points_of_different_rules_are_separate_curves():
    from bench.cost_figure import curve_of
    assert curve_of({"rule": "dyn_cum", "tau": 0.5}) == curve_of({"rule": "dyn_cum", "tau": 0.9}) == "dyn_cum"
    assert curve_of({"rule": "dyn_max", "tau": 0.5}) == "dyn_max"
    assert curve_of({"tau": 0.5}) == curve_of(None) == ""

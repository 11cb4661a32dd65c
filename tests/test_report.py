"""bench/report.py on synthetic records written into tmp_path (never results/ or reports/)."""
from __future__ import annotations

import statistics

import pytest

from bench.records import RunRecord, record_filename, write_record
from bench.report import render_reports

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "cpu": "x86_64"}
ACC = {  # (task, method) -> accuracy per seed
    ("listops", "dense"): [36.0, 38.0],
    ("listops", "bigbird"): [35.0, 36.5],
    ("text", "dense"): [64.0, 65.0],
    ("text", "bigbird"): [63.0, 64.5],
}
STEP_MS = {"dense": 10.0, "bigbird": 5.0}


def _run(task, method, seed, acc):
    sparse = method != "dense"
    return RunRecord(
        kind="run", task=task, method=method, scale="small", seed=seed, config={}, config_hash=f"h{seed}{method}",
        metrics={"accuracy": acc, "dev_accuracy": acc + 1}, higher_is_better={"accuracy": True, "dev_accuracy": True},
        measurements={"train_step_ms_median": STEP_MS[method], "infer_tokens_per_s": 1000.0 / STEP_MS[method],
                      # bigbird on text did not measure memory
                      "peak_mem_mib": None if (sparse and task == "text") else (100.0 if sparse else 400.0)},
        budget={"main_metric": "accuracy", "steps_run": 100, "reduced": task == "text", "note": "steps 20000 -> 100"},
        method_info={"family": "sparse" if sparse else "dense", "variant": "sdpa" if not sparse else None,
                     **({"density_per_layer": [0.25, 0.125]} if sparse else {})},
        env=ENV, git={"commit": "0123456789abcdef", "dirty": False}, date="2025-01-01T00:00:00+00:00", wall_time_s=1.0,
    )


def _sweep():
    rows = []
    for L in (4096, 16384):
        s = L / 4096
        rows += [dict(kernel="sdpa_cudnn", pattern="dense", density=1.0, fwd_ms=0.6 * s, fwdbwd_ms=2.2 * s),
                 dict(kernel="sdpa_flash", pattern="dense", density=1.0, fwd_ms=0.9 * s, fwdbwd_ms=3.4 * s),
                 dict(kernel="flex", pattern="dense", density=1.0, fwd_ms=0.7 * s, fwdbwd_ms=3.0 * s)]
        for d in (0.25, 0.5):
            rows += [dict(kernel="flex", pattern="random", density=d, fwd_ms=0.8 * d * s, fwdbwd_ms=3.2 * d * s),
                     dict(kernel="block_sparse_triton", pattern="random", density=d, fwd_ms=0.6 * d * s,
                          fwdbwd_ms=2.4 * d * s, lut_build_ms=0.01, density_target=d)]
        for r in rows[-7:]:
            r.update(L=L, D=64, B=1, H=16, dtype="bf16", fwd_tflops_eff=300.0, fwdbwd_tflops_eff=250.0)
    rows.append(dict(kernel="block_sparse_triton", pattern="random", L=65536, D=64, B=1, H=16, density=0.05,
                     dtype="bf16", memory_check=True, peak_extra_mib=70.0, io_tensors_mib=64.0, fwd_ms=None))
    return RunRecord(
        kind="kernel_sweep", task="attention", method="sweep", scale="paper", seed=0, config={}, config_hash="k0",
        metrics={}, higher_is_better={}, measurements={"rows": rows}, budget={}, method_info={}, env=ENV,
        git={"commit": "0123456789abcdef", "dirty": True}, date="2025-01-01T00:00:00+00:00", wall_time_s=1.0)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    results = tmp / "results"
    for (task, method), accs in ACC.items():
        for seed, acc in enumerate(accs):
            rec = _run(task, method, seed, acc)
            write_record(rec, results / "lra" / record_filename(task, method, "small", seed, rec.config_hash))
    write_record(_sweep(), results / "kernels" / "attention__sweep__paper__s0__k0.json")
    refs = {"listops": {"LRA Transformer": 36.37}, "text": {"LRA Transformer": 64.27}}
    first = render_reports(results, tmp / "r1", refs)
    second = render_reports(results, tmp / "r2", refs)
    return tmp, first, second


def _read(tmp, run, name):
    return (tmp / run / name).read_text(encoding="utf-8")


def _cells(md, first_cell):
    """The cells of the first markdown table row whose first cell is ``first_cell``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r}")


def test_markdown_is_deterministic(rendered):
    tmp, first, second = rendered
    names = sorted(p.name for p in first if p.suffix == ".md")
    assert names == ["README.md", "kernels.md", "lra.md"]
    for name in names:
        assert _read(tmp, "r1", name) == _read(tmp, "r2", name)
    for p in first:  # SVGs are deterministic too (fixed hash salt, no date)
        if p.suffix == ".svg":
            assert p.read_bytes() == (tmp / "r2" / "figures" / p.name).read_bytes()


def test_quality_table(rendered):
    tmp, _, _ = rendered
    md = _read(tmp, "r1", "lra.md")
    mean, std = statistics.mean([36.0, 38.0]), statistics.stdev([36.0, 38.0])
    assert f"{mean:.2f} ± {std:.2f} (2)" == "37.00 ± 1.41 (2)"  # sample std (ddof=1)
    assert _cells(md, "method") == ["method", "listops (accuracy ↑)", "text (accuracy ↑)"]  # methods are rows
    assert [_cells(md, r)[1] for r in ("bigbird", "dense [sdpa]", "ref: LRA Transformer")] == \
        ["35.75 ± 1.06 (2)", "37.00 ± 1.41 (2)", "36.37"]
    assert "dense [sdpa]" in md and "ref: LRA Transformer" in md and "36.37" in md
    # text runs are reduced-budget: † on their cells, listops cells unmarked, footnote with the note
    assert "64.50 ± 0.707 (2) †" in md and "37.00 ± 1.41 (2) †" not in md
    assert "† Reduced budget" in md and "steps 20000 -> 100 (text / bigbird, text / dense [sdpa])" in md


def test_efficiency_table(rendered):
    tmp, _, _ = rendered
    md = _read(tmp, "r1", "lra.md")
    text = md.split("#### text")[1]
    assert "fastest dense method here: **dense [sdpa]** (10.00 ms/step)" in text
    cells = _cells(text, "bigbird")
    assert cells[2:9] == ["5.00", "±0.0 %", "0.50×", "200.0", "2.00×", "n/m", "n/m"]  # 2 seeds, same time
    assert cells[9] == "0.25, 0.125"
    listops = md.split("#### listops")[1].split("####")[0]
    assert "| 100.0 " in listops and "0.25×" in listops  # memory ratio 100 / 400
    assert "## Environment" in md and "NVIDIA H100 80GB HBM3" in md and "0123456789" in md


def test_kernel_report(rendered):
    tmp, _, _ = rendered
    md = _read(tmp, "r1", "kernels.md")
    assert "## NVIDIA H100 80GB HBM3, bf16, paper: L=4096, D=64 (B=1, H=16)" in md
    assert "Best dense: fwd sdpa_cudnn 0.600 ms; fwd+bwd sdpa_cudnn 2.20 ms" in md
    cells = _cells(md, "block_sparse_triton")  # first one: L=4096, random, density 0.25
    assert cells[1:3] == ["random", "0.25"]
    # fwd 0.15 ms: 0.6 / 0.15 = 4x over cuDNN; flex same layout 0.2 / 0.15 = 1.33x
    assert cells[3:9] == ["0.150", "0.600", "4.00×", "3.67×", "1.33×", "1.33×"]
    assert "L=65536" not in md.split("## Long-sequence memory check")[0]  # memory point kept out of the timings
    assert _cells(md, "paper")[2:] == ["65536", "64", "16", "0.05", "70.00", "64.00"]
    assert "0123456789-dirty" in md
    readme = _read(tmp, "r1", "README.md")
    assert "[lra.md](lra.md)" in readme and "(no records)" in readme  # e.g. glue has none


def test_figures_exist(rendered):
    tmp, first, _ = rendered
    figs = tmp / "r1" / "figures"
    for stem in ["lra_small_quality", "lra_small_step_time",
                 "kernels_paper_nvidia-h100-80gb-hbm3_bf16_l4096_d64_b1_h16_time_vs_density",
                 "kernels_paper_nvidia-h100-80gb-hbm3_bf16_block_sparse_triton_speedup_vs_l"]:
        for ext in ("png", "svg"):
            p = figs / f"{stem}.{ext}"
            assert p in first and p.stat().st_size > 1000


# ----------------------------------------------------------------------------- SPION, chance, seq-length figure

def _lra(task, method, acc, step_ms, info, by_phase=None, max_len=2048, extra_metrics=None):
    meas = {"train_step_ms_median": step_ms, "infer_tokens_per_s": 1.0, "peak_mem_mib": 1.0}
    if by_phase:
        meas["train_step_ms_median_by_phase"] = by_phase
    return RunRecord(
        kind="run", task=task, method=method, scale="small", seed=0, config={"model": {"max_len": max_len}},
        config_hash=f"h{method}", metrics={"accuracy": acc, **(extra_metrics or {})},
        higher_is_better={"accuracy": True, **{k: True for k in extra_metrics or {}}},
        measurements=meas, budget={"main_metric": "accuracy", "steps_run": 2000, "reduced": False},
        method_info=info, env=ENV, git={"commit": "0123456789abcdef", "dirty": False},
        date="2025-01-01T00:00:00+00:00", wall_time_s=1.0)


LAYOUT = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]  # density 7/16


def _spion(method, transition, **kw):
    info = {"family": "sparse", "spion_variant": method, "softmax_mode": "phantom_zero", "n_checks": 8,
            "transition_step": transition, "transition_check": 7 if transition else None, "forced_transition": False,
            "density_per_layer": [0.4375, 0.4375] if transition else [],
            "tested_with": "sparse" if transition else "dense",
            "best_checkpoint": {"phase": "dense", "step": 750}, **kw}
    if transition:
        info["layouts"] = [LAYOUT, LAYOUT]
    return info


@pytest.fixture(scope="module")
def spion_rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spion")
    recs = [
        _lra("lra_listops", "dense", 38.0, 20.0, {"family": "dense"}),
        _lra("lra_listops", "flex", 38.0, 16.0, {"family": "dense"}),
        _lra("lra_listops", "bigbird", 38.0, 10.0, {"family": "sparse", "density_per_layer": [0.25, 0.25],
                                                    "layout_layer0": LAYOUT}),
        _lra("lra_listops", "spion_cf", 37.0, 15.0, _spion("spion_cf", 1749), {"dense": 16.0, "sparse": 8.0},
             extra_metrics={"accuracy_best_sparse": 36.5}),
        _lra("lra_listops", "spion_c", 37.0, 16.0, _spion("spion_c", None), {"dense": 16.0}),
        _lra("lra_pathfinder", "dense", 51.5, 5.0, {"family": "dense"}, max_len=1024),  # within 2 points of 50
    ]
    for r in recs:
        write_record(r, tmp / "results" / "lra" / record_filename(r.task, r.method, "small", 0, r.config_hash))
    written = render_reports(tmp / "results", tmp / "r", {})
    return tmp, written, (tmp / "r" / "lra.md").read_text(encoding="utf-8")


def test_spion_table(spion_rendered):
    _, _, md = spion_rendered
    sec = md.split("### SPION")[1].split("#### lra_listops")[1]
    assert "Fastest dense: **flex** (16.00 ms/step); fastest fixed pattern: **bigbird** (10.00 ms/step" in sec
    cf = _cells(sec, "spion_cf")
    assert cf[2:] == ["spion_cf", "phantom_zero", "1749 (check 7)", "8", "0.438, 0.438", "16.00", "8.00", "–",
                      "0.50×", "0.80× (d=0.250)", "0.80× (bigbird, d=0.250)", "dense @ 750 §", "sparse",
                      "36.50 (sparse)"]
    c = _cells(sec, "spion_c")
    assert c[4:13] == ["no transition in 2000 steps", "8", "–", "16.00", "–", "–", "–", "–", "–"]
    assert c[13] == "dense @ 750"  # no transition: a dense-phase checkpoint is no pitfall
    assert "§ The best dev checkpoint is from the dense phase" in md
    assert _cells(md, "spion_cf")[1].endswith("†  §") or " §" in _cells(md, "spion_cf")[1]  # quality cell marked
    assert "§ Includes runs whose best dev checkpoint predates their switch" in md
    assert "Runs that switch attention during training (spion_cf) are timed here over all" in md
    assert "lra_pathfinder" not in md.split("### SPION")[1]  # no SPION runs there


def test_chance_marker(spion_rendered):
    _, _, md = spion_rendered
    col = _cells(md, "method").index("lra_pathfinder (accuracy ↑)")
    assert _cells(md, "spion_cf")[col] == "–"  # no SPION run on Pathfinder
    assert "51.50 (1) ◦" in md and "38.00 (1) ◦" not in md
    assert "◦ Within 2 points of chance accuracy: the run did not learn the task at this budget." in md


def test_spion_figures(spion_rendered):
    tmp, written, md = spion_rendered
    for stem in ["lra_small_lra_listops_spion_cf_s0_layouts", "lra_small_lra_listops_bigbird_s0_layout0",
                 "lra_small_step_time_vs_length"]:
        for ext in ("png", "svg"):
            p = tmp / "r" / "figures" / f"{stem}.{ext}"
            assert p in written and p.stat().st_size > 1000
        assert f"(figures/{stem}.png)" in md
    assert not (tmp / "r" / "figures" / "lra_small_lra_listops_spion_c_s0_layouts.png").exists()


def test_errata_label_affected_records(tmp_path):
    import json

    results = tmp_path / "results"
    rec = _run("listops", "dense", 0, 37.0)
    name = record_filename("listops", "dense", "small", 0, rec.config_hash)
    write_record(rec, results / "lra" / name)
    (results / "errata.json").write_text(json.dumps(
        [{"id": 7, "records": [f"lra/{name}"], "affects": "timings", "note": "mask was materialised"},
         {"id": 8, "records": [f"lra/{name}"], "affects": "provenance only", "note": "stale git field",
          "label_in_tables": False}]))
    render_reports(results, tmp_path / "rep")
    md = (tmp_path / "rep" / "lra.md").read_text()
    assert "**erratum 7** (timings; 1 record(s) here): mask was materialised" in md
    assert "**erratum 8** (provenance only; 1 record(s) here): stale git field" in md
    assert "dense [sdpa; erratum 7]" in md and "erratum 8]" not in md  # provenance errata: listed, not stamped
    assert json.loads((results / "lra" / name).read_text())["method_info"]["variant"] == "sdpa"  # record untouched


def test_tasks_without_records_are_named(tmp_path):
    results = tmp_path / "results"
    rec = _run("listops", "dense", 0, 37.0)
    write_record(rec, results / "lra" / record_filename("listops", "dense", "small", 0, rec.config_hash))
    render_reports(results, tmp_path / "rep", suite_tasks={"lra": {"listops": None, "retrieval": "no AAN files",
                                                                   "image": None}})
    md = (tmp_path / "rep" / "lra.md").read_text()
    assert "- `retrieval`: data not available (no AAN files)" in md
    assert "- `image`: not run yet" in md and "- `listops`" not in md


def test_nearest_density_fixed_pattern():
    from methods.spion import _nearest_density

    fixed = {"bigbird": (10.0, 0.30), "local": (12.0, 0.06), "strided": (float("nan"), 0.05)}  # strided: not timed
    assert _nearest_density(fixed, [0.05, 0.05]) == ("local", 12.0, 0.06)
    assert _nearest_density(fixed, [])[0] is None


# ----------------------------------------------------------------------------- families, method sections

def test_unknown_method_of_family_fixed_pattern_is_a_fixed_pattern(tmp_path):
    """Reports go by family, not by name: a method the report has never heard of, of family "fixed_pattern", is
    compared with SPION and gets its layout drawn like the registered fixed patterns."""
    results = tmp_path / "results"
    recs = [
        _lra("lra_listops", "dense", 38.0, 20.0, {"family": "dense"}),
        _lra("lra_listops", "my_window", 38.0, 10.0, {"family": "fixed_pattern", "density_per_layer": [0.25, 0.25],
                                                      "layout_layer0": LAYOUT}),
        _lra("lra_listops", "spion_cf", 37.0, 15.0, _spion("spion_cf", 1749), {"dense": 16.0, "sparse": 8.0}),
        # a legacy "sparse" record of a method not registered is no fixed pattern (no family to map it to)
        _lra("lra_listops", "gone_method", 38.0, 1.0, {"family": "sparse", "density_per_layer": [0.4375, 0.4375]}),
    ]
    for r in recs:
        write_record(r, results / "lra" / record_filename(r.task, r.method, "small", 0, r.config_hash))
    written = render_reports(results, tmp_path / "r", {})
    md = (tmp_path / "r" / "lra.md").read_text(encoding="utf-8")
    sec = md.split("### SPION")[1]
    assert "fastest fixed pattern: **my_window** (10.00 ms/step, mean density 0.250)" in sec
    assert _cells(sec, "spion_cf")[11:13] == ["0.80× (d=0.250)", "0.80× (my_window, d=0.250)"]
    assert "gone_method" not in sec
    p = tmp_path / "r" / "figures" / "lra_small_lra_listops_my_window_s0_layout0.png"
    assert p in written and "(figures/lra_small_lra_listops_my_window_s0_layout0.png)" in sec


def test_legacy_sparse_family_maps_to_the_registered_family():
    import dataclasses

    from bench.report import _runs_frame

    recs = []
    for method, fam in (("spion_c", "sparse"), ("bigbird", "sparse"), ("flex", "dense"), ("gone_method", "sparse")):
        rec = dataclasses.asdict(_lra("lra_listops", method, 1.0, 1.0, {"family": fam}))
        recs.append({**rec, "_path": f"{method}.json"})
    df = _runs_frame(recs).set_index("method")
    assert df.family.to_dict() == {"bigbird": "fixed_pattern", "flex": "dense", "gone_method": "sparse",
                                   "spion_c": "learned_pattern"}
    assert df.dense.to_dict() == {"bigbird": False, "flex": True, "gone_method": False, "spion_c": False}


def test_one_section_per_implementation(tmp_path, monkeypatch):
    """spion_c, spion_f and spion_cf share one report_section: called once per scale, with all three names."""
    import methods.spion as S
    from bench.registry import METHODS

    calls = []
    real = S._Spion.report_section.__func__

    def spy(cls, runs, ctx):
        calls.append((cls.name, ctx.scale, ctx.methods))
        return real(cls, runs, ctx)

    for name in ("spion_c", "spion_cf", "spion_f"):
        assert METHODS[name].report_section.__func__ is real
    monkeypatch.setattr(S._Spion, "report_section", classmethod(spy))
    results = tmp_path / "results"
    for r in (_lra("lra_listops", "spion_cf", 37.0, 15.0, _spion("spion_cf", 1749)),
              _lra("lra_listops", "spion_c", 37.0, 16.0, _spion("spion_c", None))):
        write_record(r, results / "lra" / record_filename(r.task, r.method, "small", 0, r.config_hash))
    render_reports(results, tmp_path / "r", {})
    assert calls == [("spion_c", "small", ("spion_c", "spion_cf", "spion_f"))]


def test_report_names_no_method():
    """bench/report.py groups by family; method-specific text lives in the methods' report_section."""
    import inspect

    import bench.report
    from bench.method import FAMILIES
    from bench.registry import METHODS, load_all

    load_all()
    src = inspect.getsource(bench.report)
    assert "spion" not in src.lower()
    # names that are also families or names of the kernel sweep's kernels and layout patterns (not methods)
    allowed = set(FAMILIES) | {"flex", "local", "bigbird"}
    for name in METHODS:
        assert name in allowed or name not in src, name


# ----------------------------------------------------------------------------- honest averages (issue 10)

def _lra_cfg(seed, acc, steps=100, method="dense"):
    rec = _run("listops", method, seed, acc)
    rec.config = {"task": "listops", "seed": seed, "train": {"steps": steps, "lr": 1e-3}, "device": f"cuda:{seed}"}
    rec.config_hash = f"c{seed}{steps}"
    return rec


def _write(results, recs):
    for r in recs:
        write_record(r, results / "lra" / record_filename(r.task, r.method, r.scale, r.seed, r.config_hash))


def test_runs_with_different_configs_under_one_label_are_marked(tmp_path):
    results = tmp_path / "results"
    _write(results, [_lra_cfg(0, 36.0), _lra_cfg(1, 38.0, steps=200), _lra_cfg(0, 30.0, method="bigbird"),
                     _lra_cfg(1, 31.0, method="bigbird")])  # bigbird: seeds (and devices) differ only
    render_reports(results, tmp_path / "rep")
    md = (tmp_path / "rep" / "lra.md").read_text()
    quality = md.split("### Quality")[1].split("### Efficiency")[0]
    dense_row = next(line for line in quality.splitlines() if line.startswith("| dense"))
    bigbird_row = next(line for line in quality.splitlines() if line.startswith("| bigbird"))
    assert "≠" in dense_row and "≠" not in bigbird_row
    assert "configs differ in more than the seed" in quality and "listops / dense [sdpa] (train.steps)" in quality


def test_a_nan_main_metric_left_out_of_mean_and_n_is_said(tmp_path):
    results = tmp_path / "results"
    _write(results, [_lra_cfg(0, 36.0), _lra_cfg(1, float("nan")), _lra_cfg(2, 38.0)])
    render_reports(results, tmp_path / "rep")
    quality = (tmp_path / "rep" / "lra.md").read_text().split("### Quality")[1].split("### Efficiency")[0]
    row = next(line for line in quality.splitlines() if line.startswith("| dense"))
    assert "(2)" in row and "∅" in row
    assert "left out of the mean and of (n): listops / dense [sdpa]: 1 of 3" in quality


def test_a_copy_of_a_record_under_another_name_is_counted_once(tmp_path, capsys):
    """A record copied to another run's name (seed 0's file as seed 1's) used to be averaged twice, marked as if
    two runs' configs differed."""
    import shutil

    results = tmp_path / "results"
    r0 = _lra_cfg(0, 36.0)
    _write(results, [r0, _lra_cfg(2, 40.0)])
    src = results / "lra" / record_filename(r0.task, r0.method, r0.scale, 0, r0.config_hash)
    copy = results / "lra" / record_filename(r0.task, r0.method, r0.scale, 1, "c1100")
    shutil.copy(src, copy)
    shutil.copy(src, results / "lra" / "backup.json")
    render_reports(results, tmp_path / "rep")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 2 and all(f"a copy of {src}" in w and "counted once" in w for w in warnings)
    quality = (tmp_path / "rep" / "lra.md").read_text().split("### Quality")[1].split("### Efficiency")[0]
    row = next(line for line in quality.splitlines() if line.startswith("| dense"))
    assert "38.00 ± 2.83 (2)" in row and "‡" not in row
    # two separate runs of one seed (another date) are both kept, and marked
    twin = _lra_cfg(0, 30.0)
    twin.date = "2025-02-01T00:00:00+00:00"
    write_record(twin, results / "lra" / "other_box" / src.name)
    copy.unlink()
    (results / "lra" / "backup.json").unlink()
    render_reports(results, tmp_path / "rep2")
    quality = (tmp_path / "rep2" / "lra.md").read_text().split("### Quality")[1].split("### Efficiency")[0]
    assert "(3) ‡" in next(line for line in quality.splitlines() if line.startswith("| dense"))
    assert "Several records (separate runs) share a seed" in quality


def test_render_only_the_asked_suites(tmp_path):
    results = tmp_path / "results"
    _write(results, [_lra_cfg(0, 36.0)])
    write_record(_sweep(), results / "kernels" / "attention__sweep__paper__s0__k0.json")
    written = render_reports(results, tmp_path / "rep", suites={"lra"})
    names = {p.name for p in written if p.suffix == ".md"}
    assert names == {"lra.md", "README.md"} and not (tmp_path / "rep" / "kernels.md").exists()
    assert "kernels.md" in (tmp_path / "rep" / "README.md").read_text()  # the index still lists every suite


def test_summary_table_compares_with_the_fastest_dense(tmp_path):
    from bench.records import load_records
    from bench.report import summary_table

    results = tmp_path / "results"
    _write(results, [_run("listops", "dense", 0, 36.0), _run("listops", "bigbird", 0, 35.0)])
    text = summary_table(load_records(results))
    bigbird = next(line for line in text.splitlines() if line.startswith("| bigbird"))
    assert "0.50×" in bigbird and "0.188" in bigbird  # 5 ms vs 10 ms; mean density of [0.25, 0.125]
    assert "ratios to dense" in text


def test_step_time_ratios_never_cross_hardware(tmp_path):
    # an old dense record measured on another GPU (faster) must not become the reference of the new runs
    old_dense = _lra_cfg(0, 36.0)
    new_dense, new_sparse = _lra_cfg(1, 37.0), _lra_cfg(1, 35.0, method="bigbird")
    old_dense.measurements = {**old_dense.measurements, "train_step_ms_median": 2.0}
    for r in (new_dense, new_sparse):
        r.env = {**ENV, "gpu": "NVIDIA H200"}
    new_dense.config_hash, new_sparse.config_hash = "new-d", "new-s"
    results = tmp_path / "results"
    _write(results, [old_dense, new_dense, new_sparse])
    render_reports(results, tmp_path / "rep")
    eff = (tmp_path / "rep" / "lra.md").read_text().split("### Efficiency")[1]
    h200 = eff.split("#### listops (NVIDIA H200)")[1].split("####")[0]
    assert "#### listops (NVIDIA H100 80GB HBM3)" in eff
    row = next(line for line in h200.splitlines() if line.startswith("| bigbird"))
    assert "0.50×" in row  # 5 ms / the H200 dense's 10 ms, not / the H100 dense's 2 ms


# ----------------------------------------------------------------------------- figures readable at a glance (issue 11)

def test_figures_stay_readable_with_many_tasks_methods_and_lines(tmp_path, monkeypatch):
    """The step-time figure of 4 tasks x 9 methods is small multiples, not a 4621x421 strip, and its legend covers
    no panel; the kernel speedup figure with 16 lines (4 patterns x 4 densities) uses one colour per density and
    one marker per pattern (it used 16 similar colours)."""
    import bench.report
    from matplotlib.colors import to_hex

    figs = {}
    save = bench.report.save_figure
    monkeypatch.setattr(bench.report, "save_figure", lambda fig, d, name: figs.setdefault(name, fig) and save(fig, d, name))
    results = tmp_path / "results"
    methods = ["dense", "bigbird", "local", "longformer", "strided", "spion_c", "spion_f", "spion_cf", "flexish"]
    for task in ("listops", "text", "image", "pathfinder"):
        for i, method in enumerate(methods):
            rec = _run(task, method if method == "dense" else "bigbird", 0, 40.0)
            rec.method, rec.config_hash = method, f"h{method}"
            rec.measurements["train_step_ms_median"] = 5.0 + i
            write_record(rec, results / "lra" / record_filename(task, method, "small", 0, rec.config_hash))
    sweep = _sweep()
    rows = [r for r in sweep.measurements["rows"] if r["kernel"] != "block_sparse_triton"]
    for L in (4096, 16384):
        for pattern in ("random", "local", "bigbird", "strided"):
            for d in (0.1, 0.25, 0.5, 0.75):
                rows.append(dict(kernel="block_sparse_triton", pattern=pattern, density=d, density_target=d, L=L, D=64,
                                 B=1, H=16, dtype="bf16", fwd_ms=0.6 * d * L / 4096, fwdbwd_ms=2.4 * d * L / 4096,
                                 lut_build_ms=0.01, fwd_tflops_eff=300.0, fwdbwd_tflops_eff=250.0))
    sweep.measurements["rows"] = rows
    write_record(sweep, results / "kernels" / "attention__sweep__paper__s0__k0.json")
    render_reports(results, tmp_path / "rep")

    step = figs["lra_small_step_time"]
    w, h = step.get_size_inches()
    assert w / h <= 3.5 and w <= 12, (w, h)
    step.canvas.draw()
    panels = [ax.get_window_extent() for ax in step.axes if ax.get_visible()]
    assert len(panels) == 4
    for legend in step.legends:
        box = legend.get_window_extent()
        assert not any(box.overlaps(p) for p in panels), "the legend covers a panel"
    speed = next(f for n, f in figs.items() if n.endswith("speedup_vs_l"))
    lines = [ln for ax in speed.axes for ln in ax.get_lines() if ln.get_marker() not in ("None", None, "")]
    assert len(lines) >= 16
    assert len({to_hex(ln.get_color()) for ln in lines}) == 4 and len({ln.get_marker() for ln in lines}) == 4

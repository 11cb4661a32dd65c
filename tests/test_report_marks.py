"""bench/report.py marks and columns added for issue 15, on synthetic records in tmp_path: the quality table's mark
for dense->sparse runs that never switched (next to the dense-checkpoint mark), the efficiency table's GPU-busy
column, the ``published`` scale's lineage line, and the SPION section's precision and check-interval sentences."""
from __future__ import annotations

import pytest

from bench.records import RunRecord, record_filename, write_record
from bench.report import DENSE_CKPT, NEVER_SPARSE, never_switched, render_reports

ENV = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "cpu": "x86_64"}


def _config(device="cuda:0", amp="auto", eval_every=250, fp32=False, check_every=0):
    return {"device": device, "model": {"max_len": 2048}, "train": {"amp": amp, "eval_every": eval_every},
            "method_cfg": {"attention_fp32": fp32, "check_every": check_every}}


def _rec(method, acc, info, seed=0, scale="small", task="lra_listops", busy=None, launches=None, config=None):
    meas = {"train_step_ms_median": 10.0, "infer_tokens_per_s": 1.0, "peak_mem_mib": 1.0,
            "gpu_busy_fraction": busy, "kernel_launches_per_step": launches}
    return RunRecord(
        kind="run", task=task, method=method, scale=scale, seed=seed, config=config or _config(),
        config_hash=f"h{method}{seed}", metrics={"accuracy": acc}, higher_is_better={"accuracy": True},
        measurements=meas, budget={"main_metric": "accuracy", "steps_run": 2000, "reduced": scale == "small"},
        method_info=info, env=ENV, git={"commit": "0123456789abcdef", "dirty": False},
        date="2025-01-01T00:00:00+00:00", wall_time_s=1.0)


def _spion(transition, best_phase="sparse"):
    return {"family": "learned_pattern", "spion_variant": "spion_cf", "softmax_mode": "phantom_zero", "n_checks": 3,
            "transition_step": transition, "transition_check": 3 if transition else None, "forced_transition": False,
            "density_per_layer": [0.25, 0.25] if transition else [],
            "tested_with": "sparse" if transition is not None else "dense",
            "best_checkpoint": {"phase": best_phase, "step": 750}}


def _render(tmp_path, recs):
    for r in recs:
        write_record(r, tmp_path / "results" / "lra" / record_filename(r.task, r.method, r.scale, r.seed,
                                                                        r.config_hash))
    render_reports(tmp_path / "results", tmp_path / "r", {})
    return (tmp_path / "r" / "lra.md").read_text(encoding="utf-8")


def _row(md: str, first: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith(f"| {first} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_never_switched():
    assert never_switched({"tested_with": "dense"})
    assert not never_switched({"tested_with": "sparse"}) and not never_switched({"family": "dense"})


def test_quality_marks_dense_phase_values_apart_from_sparse_ones(tmp_path):
    md = _render(tmp_path, [
        _rec("dense", 38.0, {"family": "dense"}),
        _rec("spion_cf", 37.0, _spion(1749, "sparse")),  # trained and tested sparse: unmarked
        _rec("spion_c", 36.0, _spion(None, "dense")),  # never switched: the value is a dense model's
        _rec("spion_f", 35.0, _spion(1749, "dense")),  # switched, but the tested checkpoint is a dense-phase one
    ])
    quality = md.split("### Quality")[1].split("### Efficiency")[0]
    assert NEVER_SPARSE not in _row(quality, "spion_cf")[1] and DENSE_CKPT not in _row(quality, "spion_cf")[1]
    assert _row(quality, "spion_c")[1].endswith(NEVER_SPARSE) and DENSE_CKPT not in _row(quality, "spion_c")[1]
    assert DENSE_CKPT in _row(quality, "spion_f")[1] and NEVER_SPARSE not in _row(quality, "spion_f")[1]
    assert NEVER_SPARSE not in _row(quality, "dense")[1]
    assert (f"{NEVER_SPARSE} Includes runs of a method that switches from dense to sparse attention but never "
            "switched: their value comes from the dense phase") in quality
    assert f"Cells without {NEVER_SPARSE} or {DENSE_CKPT} come from runs that trained and were tested sparse" in quality
    sec = md.split("### SPION")[1]
    assert _row(sec, "spion_c")[14] == f"dense {NEVER_SPARSE}" and _row(sec, "spion_cf")[14] == "sparse"
    assert f"{NEVER_SPARSE} The run never switched to sparse attention" in sec


def test_no_never_switched_note_without_such_runs(tmp_path):
    md = _render(tmp_path, [_rec("dense", 38.0, {"family": "dense"}), _rec("spion_cf", 37.0, _spion(1749))])
    assert NEVER_SPARSE not in md


def test_gpu_busy_column_only_when_a_record_has_it(tmp_path):
    md = _render(tmp_path, [_rec("dense", 38.0, {"family": "dense"}, busy=0.95, launches=120.0),
                            _rec("dense", 38.5, {"family": "dense"}, seed=1, busy=0.85, launches=130.0),
                            _rec("spion_cf", 37.0, _spion(1749))])  # this one has None (a CPU-style record)
    eff = md.split("### Efficiency")[1].split("### SPION")[0]
    header = _row(eff, "method")
    assert "GPU busy" in header and "kernels / step" in header
    col, kcol = header.index("GPU busy"), header.index("kernels / step")
    assert _row(eff, "dense")[col] == "0.90" and _row(eff, "dense")[kcol] == "125"  # means over the two runs
    assert _row(eff, "spion_cf")[col] == "n/m" and _row(eff, "spion_cf")[kcol] == "n/m"
    assert "`GPU busy`: device time (union of kernel, memcpy and memset intervals) over host wall time" in eff

    md = _render(tmp_path / "cpu", [_rec("dense", 38.0, {"family": "dense"})])
    assert "GPU busy" not in md


def test_published_scale_says_its_lineage_and_is_a_section_of_its_own(tmp_path):
    md = _render(tmp_path, [_rec("dense", 38.0, {"family": "dense"}), _rec("dense", 37.0, {"family": "dense"},
                                                                          scale="published")])
    assert md.index("## Scale: small") < md.index("## Scale: published")
    pub = md.split("## Scale: published")[1]
    assert "Config lineage: LRA only: the PyTorch re-runs' config lineage" in pub
    assert "37.00 (1)" in pub and "38.00" not in pub and "†" not in _row(pub, "dense")[1]  # never averaged; full budget


def test_spion_section_states_precision_and_check_interval(tmp_path):
    md = _render(tmp_path, [_rec("dense", 38.0, {"family": "dense"}),
                            _rec("spion_cf", 37.0, _spion(1749)),
                            _rec("spion_cf", 37.5, _spion(1749), task="lra_text", config=_config(eval_every=500))])
    sec = md.split("### SPION")[1]
    assert ("Precision: SPION's attention ran in bf16 under autocast (`attention_fp32=False`, the suite's common "
            "precision policy) in 2 of 2 runs, where the original runs attention in fp32 with autocast disabled") in sec
    listops = sec.split("#### lra_listops")[1].split("####")[0]
    assert ("Transition checked every 250 steps, at each eval (`train.eval_every` = 250); the paper checks at its "
            "eval steps, every 500 steps for this task") in listops
    text = sec.split("#### lra_text")[1]
    assert "every 500 steps, at each eval (`train.eval_every` = 500)" in text and "every 200 steps for this task" in text


@pytest.mark.parametrize("config, said", [
    (_config(fp32=True), "ran in fp32 with autocast disabled, as the original (`attention_fp32=True`), in 1 of 1 runs"),
    (_config(device="cpu"), "ran in fp32 (no autocast: `train.amp` off or a CPU run) in 1 of 1 runs"),
    (_config(amp="fp16"), "ran in fp16 under autocast"),
    (_config(check_every=10, eval_every=50), "every 10 steps (`method.check_every`; the eval interval "
                                             "`train.eval_every` is 50)"),
])
def test_spion_sentences_follow_the_records(tmp_path, config, said):
    md = _render(tmp_path, [_rec("spion_cf", 37.0, _spion(1749), config=config)])
    assert said in md.split("### SPION")[1]


def test_spion_section_says_nothing_the_records_do_not_say(tmp_path):
    md = _render(tmp_path, [_rec("spion_cf", 37.0, _spion(1749), config={"model": {"max_len": 2048}})])
    sec = md.split("### SPION")[1]
    assert "Precision:" not in sec and "Transition checked" not in sec

"""run_all.py end to end on CPU: errors are one line, sweeps resume after a kill, reports render.

Most cases run the CLI in this process (``run_all``: ``bench.cli.main`` with stdout/stderr captured), which is what
``python run_all.py`` does minus the interpreter start-up; only the kill test needs a real subprocess."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_all(*args) -> Result:
    """``python run_all.py *args`` in this process: exit code and what it printed."""
    from bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return Result(rc, out.getvalue(), err.getvalue())


def run_all_subprocess(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "run_all.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args, msg", [
    (["--suite", "nope"], "unknown suite 'nope'; valid suites: all, glue, kernels, lm, lra"),
    (["--suite", "lra", "--tasks", "nope"], "unknown task 'nope'; valid tasks:"),
    (["--suite", "lra", "--methods", "nope"], "unknown method 'nope'; valid methods:"),
    (["--suite", "lra", "--tasks", "listops", "train.lr=fast"], "invalid value for train.lr"),
    (["--suite", "lra", "--tasks", "listops", "train.bogus=1"], "has no field 'bogus'"),
    (["--suite", "lra", "--tasks", "listops", "--data-dir", "/nonexistent/dir"], "--data-dir /nonexistent/dir does not exist"),
    (["--suite", "lra", "--tasks", "listops", "--methods", "dense:backend=warp"], "unknown SDPA backend 'warp'"),
    (["--suite", "lra", "--tasks", "listops", "train.steps=0"], "invalid value for train.steps"),
    (["--suite", "lra", "--tasks", "listops", "model.n_heads=3"], "model.n_heads: 3; it must divide"),
    (["--suite", "lra", "--tasks", "listops", "--methods", "local:density=nan"], "local:density"),
    (["--suite", "lra", "--tasks", "listops", "--methods", "local:block_size=48"], "local:block_size=48"),
])
def test_one_line_errors(tmp_path, args, msg):
    r = run_all(*args, "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_malformed_data_file_names_the_file(tmp_path):
    d = tmp_path / "data" / "lra_listops"
    d.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (d / f"basic_{split}.tsv").write_text("Source\tTarget\n( [MAX 1 2 ] )\n")  # missing label column
    r = run_all("--suite", "lra", "--tasks", "listops", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "basic_" in r.stderr and ".tsv" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_prints_the_matrix(tmp_path):
    r = run_all("--suite", "lra", "--tasks", "listops", "--methods", "dense", "eager", "--seeds", "0", "1",
                "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[todo]") == 4


def test_short_task_names_resolve_within_their_suite():
    from bench.cli import resolve_tasks

    assert resolve_tasks("lra", ["listops"]) == (["lra_listops"], True)
    assert resolve_tasks("summarization", ["qmsum"]) == (["sum_qmsum"], True)  # prefix is not the suite name
    assert resolve_tasks("glue", ["sst2", "glue_rte"]) == (["glue_sst2", "glue_rte"], True)


@pytest.mark.slow
def test_sweep_resumes_after_kill_and_reports(tmp_path):
    out, reports = tmp_path / "results", tmp_path / "reports"
    args = ["--suite", "lra", "--tasks", "listops", "--methods", "dense", "--seeds", "0", "1", "2",
            "--out", str(out), "--reports-dir", str(reports), "--no-progress", "train.steps=40", "train.eval_every=20"]
    p = subprocess.Popen([sys.executable, "run_all.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    # wait for the first record, then for the sweep to be inside a later run (it prints 'running' before each run
    # when not on a terminal): no fixed sleep, so a busy machine only makes the test slower
    lines = []
    while time.time() < deadline and p.poll() is None:
        line = p.stdout.readline()
        lines.append(line)
        if out.is_dir() and list(out.rglob("*.json")) and line.startswith("[2/3]") and ": running" in line:
            break
    assert p.poll() is None, "".join(lines)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = sorted(out.rglob("*.json"))
    assert 1 <= len(finished) < 3
    for f in finished:
        json.loads(f.read_text())  # every file present is complete
    r = run_all_subprocess(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done already") == len(finished)
    records = sorted(out.rglob("*.json"))
    assert len(records) == 3 and not list(out.rglob(".*.tmp"))
    assert {json.loads(f.read_text())["seed"] for f in records} == {0, 1, 2}
    md = (reports / "lra.md").read_text()
    assert "lra_listops" in md and "(3)" in md
    assert (reports / "figures" / "lra_tiny_quality.png").exists()
    # reports are deterministic
    before = md
    assert run_all("--report", "--out", str(out), "--reports-dir", str(reports)).returncode == 0
    assert (reports / "lra.md").read_text() == before


def test_lra_suite_runs_what_it_can_and_says_why_it_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_all("--suite", "lra", "--methods", "dense", "--no-progress",
                "--out", str(tmp_path / "r"), "--reports-dir", str(tmp_path / "rep"),
                "train.steps=4", "train.eval_every=2", "data.n_train=64", "data.n_dev=32", "data.n_test=32")
    assert r.returncode == 0, r.stderr
    skips = [line for line in r.stdout.splitlines() if line.startswith("skip ")]
    assert sorted(line.split(":")[0] for line in skips) == ["skip lra_image", "skip lra_retrieval", "skip lra_text"]
    assert all("--data-dir" in line for line in skips)
    assert {p.name.split("__")[0] for p in (tmp_path / "r" / "lra").glob("*.json")} == {"lra_listops", "lra_pathfinder"}
    assert "data not available" in (tmp_path / "rep" / "lra.md").read_text()


def test_resume_says_when_the_kept_record_was_measured_elsewhere(tmp_path):
    import torch

    from bench.cli import _other_hardware_note

    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"env": {"gpu": None}}))
    assert _other_hardware_note(rec, torch.device("cpu")) == ""
    rec.write_text(json.dumps({"env": {"gpu": "NVIDIA H100 80GB HBM3"}}))
    note = _other_hardware_note(rec, torch.device("cpu"))
    assert "measured on NVIDIA H100 80GB HBM3, this machine is CPU" in note and "without --resume" in note


def test_kernels_suite_takes_no_methods_and_checks_record_layouts_first(tmp_path):
    r = run_all("--suite", "kernels", "--dry-run", "--out", str(tmp_path))
    assert r.returncode == 0 and "skip method" not in r.stdout and r.stdout.count("[todo]") == 2
    assert "kernel_sweep__" in r.stdout and "moe_ffn_sweep__" in r.stdout  # a suite runs all its tasks
    r = run_all("--suite", "kernels", "sweep.record_layouts=/nonexistent.json", "--out", str(tmp_path))
    assert r.returncode == 2 and "sweep.record_layouts: /nonexistent.json is not a file" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))  # failed before anything was timed or written


@pytest.mark.parametrize("setup", ["missing", "empty", "only_bad"])
def test_report_with_no_records_in_out_fails_in_one_line(tmp_path, setup):
    out = tmp_path / "reslts"  # a typo of results/
    if setup != "missing":
        out.mkdir()
    if setup == "only_bad":
        (out / "x.json").write_text("{")
    r = run_all("--report", "--out", str(out), "--reports-dir", str(tmp_path / "rep"))
    assert r.returncode == 2 and r.stderr.startswith("error: --out ") and str(out) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()  # no reports rewritten from nothing


def _committed_record() -> Path:
    return sorted((ROOT / "results" / "lra").glob("lra_listops__*.json"))[0]


def test_one_malformed_record_does_not_break_the_report(tmp_path):
    out = tmp_path / "results"
    (out / "lra").mkdir(parents=True)
    good = _committed_record()
    (out / "lra" / good.name).write_bytes(good.read_bytes())
    bad = json.loads(good.read_text())
    bad["metrics"][next(iter(bad["metrics"]))] = "n/a"
    (out / "lra" / ("broken__" + good.name)).write_text(json.dumps(bad))
    r = run_all("--report", "--out", str(out), "--reports-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 1 and "broken__" in warnings[0] and "expected a number or null" in warnings[0]
    assert "Rendered from 1 record(s)" in (tmp_path / "rep" / "lra.md").read_text()


def test_corrupt_errata_warns_in_one_line_and_the_report_still_renders(tmp_path):
    """A corrupt errata.json must not break --report for everything else; the reports say the errata are missing."""
    out = tmp_path / "results"
    (out / "lra").mkdir(parents=True)
    good = _committed_record()
    (out / "lra" / good.name).write_bytes(good.read_bytes())
    (out / "errata.json").write_text('[{"id": 1, "records": [')
    r = run_all("--report", "--out", str(out), "--reports-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "errata.json" in warnings[0] and "not valid JSON" in warnings[0]
    assert "Traceback" not in r.stdout + r.stderr
    md = (tmp_path / "rep" / "lra.md").read_text()
    assert "Rendered from 1 record(s)" in md and "Known defects are not marked here" in md


def test_help_documents_resume_and_concurrent_sweeps():
    r = run_all("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "running in another sweep" in text and ".aside" in text and "config hash" in text

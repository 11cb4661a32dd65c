"""A newcomer's first hour (issue 11): the main job writes only into the git-ignored runs/ folder and ends with a
comparison; the dry run lists exactly the runs the sweep does; a CUDA-only option on a CPU, a suite with nothing
to run, an unknown --artifacts folder: one line each. All in this process (``bench.cli.main``), into tmp folders."""
import hashlib
import json
import os
from pathlib import Path

import pytest

from bench.cli import main, plan_runs, build_parser

ROOT = Path(__file__).resolve().parents[2]
TINY = ["train.steps=4", "train.eval_every=2", "data.n_train=32", "data.n_dev=16", "data.n_test=16"]
LRA_DATA_FOLDERS = ("lra_listops", "lra_pathfinder", "lra_text_imdb", "lra_image_cifar10")


def _tree_state(root: Path) -> dict:
    """path -> (size, mtime, sha256 prefix) of every file under ``root``."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest()[:16])
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_main_job_writes_nothing_into_results_or_reports(tmp_path, monkeypatch, capsys):
    """No write into results/ or reports/ without asking: the default --out is runs/ (git-ignored) and a sweep
    renders no report unless --reports-dir is given; it prints the comparison and the command that renders."""
    work = tmp_path / "checkout"
    for d in ("results/lra", "reports"):
        (work / d).mkdir(parents=True)
    (work / "results" / "lra" / "committed.json").write_text("{}")
    (work / "reports" / "lra.md").write_text("# lra (committed)\n")
    before_tmp = {d: _tree_state(work / d) for d in ("results", "reports")}
    before_repo = {d: _tree_state(ROOT / d) for d in ("results", "reports")}
    monkeypatch.chdir(work)

    assert main(["--suite", "lra", "--tasks", "listops", "--methods", "eager", "--no-progress", *TINY]) == 0
    out = capsys.readouterr().out
    records = sorted((work / "runs" / "lra").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["method"] == "eager"
    for d in ("results", "reports"):
        assert _tree_state(work / d) == before_tmp[d], d
        assert _tree_state(ROOT / d) == before_repo[d], d
    assert not (work / "runs" / "reports").exists()  # nothing rendered unasked
    # the closing comparison, the CPU caveat and how to render
    assert "step / fastest dense" in out and "attention density" in out and "| eager" in out
    assert "not performance numbers" in out
    assert "python run_all.py --report --out runs" in out
    rec = json.loads(records[0].read_text())
    assert "overrides: train.steps=4 (preset 300)" in rec["budget"]["note"]  # the note says the budget changed


def test_gitignore_covers_the_default_out():
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
    assert build_parser().parse_args([]).out is None  # resolved to runs/ for a sweep, results/ for --report


def test_report_renders_runs_next_to_them_not_into_reports(tmp_path, monkeypatch, capsys):
    work = tmp_path / "checkout"
    (work / "reports").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert main(["--suite", "lra", "--tasks", "listops", "--methods", "eager", "--no-progress", *TINY]) == 0
    assert main(["--report", "--out", "runs"]) == 0
    assert (work / "runs" / "reports" / "lra.md").exists() and not list((work / "reports").iterdir())
    # a sweep given --reports-dir renders only the suites it ran
    capsys.readouterr()
    assert main(["--suite", "lra", "--tasks", "listops", "--methods", "eager", "--no-progress", "--resume",
                 "--reports-dir", str(work / "rep"), *TINY]) == 0
    assert "reports (lra):" in capsys.readouterr().out
    assert sorted(p.name for p in (work / "rep").glob("*.md")) == ["README.md", "lra.md"]


def test_dry_run_lists_exactly_the_runs_the_sweep_does(tmp_path, monkeypatch, capsys):
    """One planning function for both: skipped methods (flex on CPU) and tasks (no data offline) never show up as
    [todo], and the sweep writes exactly the records the dry run listed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r"
    args = ["--suite", "lra", "--methods", "dense", "eager", "--no-progress", "--out", str(out), *TINY]
    assert main([*args, "--dry-run"]) == 0
    listed = {line.rsplit(" -> ", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
              if line.lstrip().startswith("[todo]")}
    assert main(args) == 0
    written = {str(p) for p in out.rglob("*.json")}
    assert listed == written and len(written) == 4  # listops + pathfinder x dense + eager

    # the default methods of the suite: flex cannot train on a CPU, so the plan (dry run or not) skips it
    a = build_parser().parse_args(["--suite", "lra", "--tasks", "listops", "--out", str(out), *TINY])
    plan = plan_runs(a)
    assert "flex" not in {r.method.name for r in plan.runs}
    assert any(line.startswith("skip method flex:") for line in plan.messages)


@pytest.mark.parametrize("spec", ["dense:backend=cudnn", "dense:backend=flash"])
def test_a_cuda_only_backend_on_cpu_is_one_line(tmp_path, capsys, spec):
    assert main(["--suite", "lra", "--tasks", "listops", "--methods", spec, "--out", str(tmp_path),
                 "--device", "cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: method {spec} cannot run on cpu") and "needs CUDA" in err
    assert len(err.strip().splitlines()) == 1


def test_a_suite_with_nothing_to_run_exits_nonzero_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    for folder in LRA_DATA_FOLDERS:  # every task's folder exists but holds nothing usable
        (data / folder).mkdir(parents=True)
    for extra in (["--dry-run"], []):
        assert main(["--suite", "lra", "--methods", "eager", "--data-dir", str(data), "--out", str(tmp_path / "r"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: nothing to run") and "lra_listops" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("*.json"))


def test_artifacts_flag_sets_the_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SPARSEBENCH_ARTIFACTS", raising=False)
    cache = tmp_path / "art"
    assert main(["--artifacts", str(cache), "--suite", "lra", "--tasks", "listops", "--methods", "eager",
                 "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    assert os.environ["SPARSEBENCH_ARTIFACTS"] == str(cache.resolve())
    help_text = " ".join(build_parser().format_help().split())
    assert "--artifacts DIR" in help_text and "delete to retrain" in help_text
    (tmp_path / "file").write_text("x")
    assert main(["--artifacts", str(tmp_path / "file"), "--suite", "lra", "--dry-run", "--out", str(tmp_path)]) == 2
    assert "--artifacts" in capsys.readouterr().err


def test_the_quick_tour_is_the_default(tmp_path, capsys):
    """``python run_all.py`` with no suite: ListOps and Pathfinder, a few methods, and a line on the full suite."""
    a = build_parser().parse_args(["--out", str(tmp_path)])
    plan = plan_runs(a)
    assert plan.tour and {r.task for r in plan.runs} == {"lra_listops", "lra_pathfinder"}
    assert 4 <= len(plan.runs) <= 8 and any(r.method.name == "dense" for r in plan.runs)
    assert any("python run_all.py --suite lra" in line for line in plan.messages)


def test_task_scoped_overrides_apply_to_that_task_only():
    from bench.cli import MethodSpec, build_run_config

    o = ["lra_listops.train.steps=7"]
    assert build_run_config("lra_listops", MethodSpec("eager"), "tiny", 0, "cpu", o).train.steps == 7
    assert build_run_config("lra_pathfinder", MethodSpec("eager"), "tiny", 0, "cpu", o).train.steps != 7


def test_without_a_terminal_each_run_says_it_starts_with_an_eta_and_a_busy_cpu_is_named(tmp_path, monkeypatch,
                                                                                          capsys):
    """No progress bar outside a terminal: one '[k/N] ...: running' line per run, from the second run on with an
    estimate of the time left; a busy CPU (load average above the cores) is said once, before the first run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 0.0, 0.0))
    args = ["--suite", "lra", "--tasks", "listops", "--methods", "eager", "--seeds", "0", "1", "--no-progress",
            "--out", str(tmp_path / "r"), *TINY]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    running = [line for line in lines if line.endswith(" left") or line.endswith(": running")]
    assert [line.split(":")[0] for line in running] == ["[1/2] lra_listops eager seed 0", "[2/2] lra_listops eager seed 1"]
    assert running[0].endswith(": running") and "; about " in running[1] and running[1].endswith(" left")
    busy = [i for i, line in enumerate(lines) if line.startswith("note: the CPUs are busy")]
    assert len(busy) == 1 and busy[0] < lines.index(running[0]) and "not comparable" in lines[busy[0]]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert main([*args, "--resume"]) == 0
    assert "busy" not in capsys.readouterr().out


def test_run_all_limits_cpu_threads_to_the_cores_it_may_use(tmp_path):
    """run_all.py sets OMP_NUM_THREADS (and torch's intra-op threads) to the cores of its affinity mask, unless the
    user set OMP_NUM_THREADS; checked with the CLI's main() replaced, so nothing runs."""
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs CPU affinity (Linux)")
    probe = ("import os, runpy, sys, bench.cli, torch; "
             "bench.cli.main = lambda: print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads()) or 0; "
             "sys.argv = ['run_all.py']; runpy.run_path('run_all.py', run_name='__main__')")
    one_core = min(os.sched_getaffinity(0))
    for env_threads, want in ((None, "1 1"), ("3", "3 3")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if env_threads:
            env["OMP_NUM_THREADS"] = env_threads
        r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == want.split(), (env_threads, r.stdout, r.stderr)

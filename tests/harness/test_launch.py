"""``run_all.py --launcher submitit``: jobs run exactly what the local sweep runs (same records, --resume, failures
reported with a log path and not stopping the others). The debug executor runs jobs in this process; one test
starts real local job processes."""
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

TINY = ["train.steps=4", "train.eval_every=2", "data.n_train=32", "data.n_dev=16", "data.n_test=16"]


def run_all(*args):
    from bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def sweep(out: Path, *extra):
    return run_all("--suite", "lra", "--tasks", "listops", "--methods", "dense", "eager", "--no-progress",
                   "--out", str(out), "--artifacts", str(out.parent / "artifacts"), *extra, *TINY)


def records(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_debug_executor_writes_the_records_of_the_local_sweep(tmp_path):
    rc, stdout, err = sweep(tmp_path / "local")
    assert rc == 0, err
    rc, stdout, err = sweep(tmp_path / "sub", "--launcher", "submitit", "--submitit-executor", "debug")
    assert rc == 0, err
    assert stdout.count("finished] lra_listops") == 2 and "[2/2 finished]" in stdout
    a, b = records(tmp_path / "local"), records(tmp_path / "sub")
    assert len(a) == 2 and a.keys() == b.keys()
    for name in a:
        assert a[name]["metrics"] == b[name]["metrics"], name
        assert a[name]["config_hash"] == b[name]["config_hash"]
    # --resume through the launcher skips the finished runs and leaves their files alone
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "sub").rglob("*.json")}
    rc, stdout, err = sweep(tmp_path / "sub", "--launcher", "submitit", "--submitit-executor", "debug", "--resume")
    assert rc == 0, err
    assert stdout.count("done already") == 2 and "running" not in stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sub").rglob("*.json")} == before


def test_a_failed_job_is_one_line_with_its_log_and_the_others_go_on(tmp_path, monkeypatch):
    from bench import cli

    real = cli.run_one

    def run_one(task_name, spec, *a, **k):
        if spec.name == "eager":
            raise RuntimeError("boom inside the run")
        return real(task_name, spec, *a, **k)

    monkeypatch.setattr(cli, "run_one", run_one)
    rc, stdout, err = sweep(tmp_path / "sub", "--launcher", "submitit", "--submitit-executor", "debug")
    assert rc == 1
    failed = [ln for ln in stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and "lra_listops eager seed 0" in failed[0] and "boom inside the run" in failed[0]
    log = Path(re.search(r"log: (\S+)$", failed[0]).group(1))
    assert log.is_file() and "boom inside the run" in log.read_text()
    assert "1 of 2 jobs failed" in err
    assert [json.loads(p.read_text())["method"] for p in (tmp_path / "sub").rglob("*.json")] == ["dense"]
    # the failed run is redone by --resume, the finished one is not
    monkeypatch.setattr(cli, "run_one", real)
    rc, stdout, err = sweep(tmp_path / "sub", "--launcher", "submitit", "--submitit-executor", "debug", "--resume")
    assert rc == 0, err
    assert stdout.count("done already") == 1 and len(records(tmp_path / "sub")) == 2


def test_local_executor_runs_jobs_as_processes(tmp_path):
    """Real job processes (the run pickled, $SPARSEBENCH_ARTIFACTS passed on): same records as the
    debug executor, job logs under <out>/.submitit/."""
    rc, stdout, err = sweep(tmp_path / "sub", "--launcher", "submitit", "--submitit-executor", "local",
                            "--max-parallel", "2")
    assert rc == 0, err + stdout
    assert stdout.count("finished] lra_listops") == 2
    recs = records(tmp_path / "sub")
    assert sorted(r["method"] for r in recs.values()) == ["dense", "eager"]
    assert list((tmp_path / "sub" / ".submitit").glob("*_log.out"))
    rc, stdout, err = sweep(tmp_path / "dbg", "--launcher", "submitit", "--submitit-executor", "debug")
    assert rc == 0, err
    assert {k: v["metrics"] for k, v in records(tmp_path / "dbg").items()} == \
        {k: v["metrics"] for k, v in recs.items()}


def test_without_submitit_the_launcher_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    rc, stdout, err = sweep(tmp_path / "sub", "--launcher", "submitit")
    assert rc == 2 and "pip install submitit" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "sub").rglob("*.json"))


def test_help_teaches_the_launcher():
    rc, stdout, _ = run_all("--help")
    assert rc == 0
    for text in ("--launcher {local,submitit}", "SLURM", "--slurm-partition", "--gpus-per-job", "--max-parallel"):
        assert text in stdout
    assert "--submitit-executor" not in stdout  # testing option, hidden

"""Sweeps never lose or redo work: concurrent sweeps into one --out, killed sweeps, records at the wrong name,
records this version cannot read, the user's umask, unwritable output folders."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.cli import MethodSpec, build_run_config, main
from bench.locks import _host
from bench.records import read_record, record_filename, write_record

ROOT = Path(__file__).resolve().parents[2]
TINY = ["train.steps=4", "train.eval_every=2", "data.n_train=32", "data.n_dev=16", "data.n_test=16"]
SWEEP = ["--suite", "lra", "--tasks", "listops", "--methods", "eager", "--scale", "tiny", "--no-progress",
         "--no-report", *TINY]


def _popen(*args):
    return subprocess.Popen([sys.executable, "run_all.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _planned(out: Path, seed: int) -> Path:
    cfg = build_run_config("lra_listops", MethodSpec("eager"), "tiny", seed, "cpu", TINY)
    return out / "lra" / record_filename("lra_listops", "eager", "tiny", seed, cfg.hash)


def _records(out: Path) -> list[Path]:
    return sorted(p for p in (out / "lra").glob("*.json")) if (out / "lra").is_dir() else []


def _written(stdout: str) -> list[str]:
    """Paths a sweep wrote a new record to (its '<tag>: accuracy=... (1.2 s) -> <path>' lines)."""
    return [line.rsplit(" -> ", 1)[1].split(";")[0] for line in stdout.splitlines()
            if " -> " in line and "accuracy=" in line]


def _identity(p: Path):
    st = p.stat()
    return st.st_ino, st.st_mtime_ns, p.read_bytes()


@pytest.mark.slow
def test_two_sweeps_into_one_out_run_each_record_once(tmp_path):
    out = tmp_path / "r"
    args = [*SWEEP, "--seeds", "0", "1", "2", "3", "--resume", "--out", str(out)]
    procs = [_popen(*args) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    written = Counter(w for o in outs for w in _written(o))
    records = _records(out)
    assert len(records) == 4 and all(n == 1 for n in written.values()), (written, outs)
    assert set(written) == {str(p) for p in records}
    # every run the other sweep did not do, it says why in one line
    for o in outs:
        mine = set(_written(o))
        for p in records:
            if str(p) not in mine:
                assert any(str(p) in line and ("running in another sweep" in line or "done by another sweep" in line
                                               or "done already" in line) for line in o.splitlines()), o
    for p in records:
        read_record(p)
    assert not list(out.rglob("*.tmp")) and not (out / ".aside").exists()
    assert not [p for p in out.rglob("*.json") if ".locks" in p.parts]


@pytest.mark.slow
def test_sigint_then_sigkill_then_resume_redoes_nothing_finished(tmp_path):
    from bench.locks import RecordLock

    out = tmp_path / "r"
    args = [*SWEEP, "--seeds", "0", "1", "2", "3", "--out", str(out)]

    def start_and_stop(extra, sig, n_before):
        """Start the sweep; once it has written a record beyond ``n_before`` and says it is running the next one (the
        '[k/N] ...: running' line it prints when not on a terminal), send ``sig``. Waiting on what the sweep writes,
        not on a clock, so a busy machine makes this slower, never flaky."""
        p = _popen(*args, *extra)
        lines = []
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            line = p.stdout.readline()
            lines.append(line)
            if ": running" in line and len(_records(out)) > n_before:
                break
        assert p.poll() is None, "the sweep ended before it could be stopped:\n" + "".join(lines)
        p.send_signal(sig)
        text = "".join(lines) + p.communicate(timeout=300)[0]
        return p.returncode, text

    rc, text = start_and_stop([], signal.SIGINT, 0)
    assert rc == 130 and "interrupted" in text and "Traceback" not in text, text
    first = {p: _identity(p) for p in _records(out)}
    assert 1 <= len(first) < 4
    assert not list(out.rglob("*.tmp"))  # the interrupted write cleaned up after itself
    for seed in range(4):  # and the interrupted run's lock is free again
        lock = RecordLock(out, _planned(out, seed))
        assert lock.acquire()
        lock.release()

    # debris: a temporary file of a dead writer goes, one of a live writer (this test) stays
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    dead_tmp = out / "lra" / f".{_planned(out, 3).name}.{host}-{dead.pid}.abc123.tmp"
    live_tmp = out / "lra" / f".lra_listops__eager__tiny__s9__0000000000.json.{host}-{os.getpid()}.def456.tmp"
    dead_tmp.write_text("{")
    live_tmp.write_text("{")

    rc, text = start_and_stop(["--resume"], signal.SIGKILL, len(first))
    assert rc == -signal.SIGKILL
    assert text.count("done already") == len(first), text
    second = {p: _identity(p) for p in _records(out)}
    assert len(second) > len(first)

    r = subprocess.run([sys.executable, "run_all.py", *args, "--resume"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done already") == len(second), r.stdout
    final = _records(out)
    assert len(final) == 4 and {read_record(p)["seed"] for p in final} == {0, 1, 2, 3}
    for p, ident in second.items():
        assert _identity(p) == ident  # finished work is never redone
    assert not dead_tmp.exists() and live_tmp.exists()
    assert [p for p in out.rglob("*.tmp")] == [live_tmp]


def test_records_get_the_users_umask(tmp_path):
    from test_records import make_record

    from bench.records import atomic_write_text

    for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            p = write_record(make_record(), tmp_path / f"r{mask:o}.json")
            q = tmp_path / f"report{mask:o}.md"
            atomic_write_text(q, "x")
        finally:
            os.umask(old)
        assert stat.S_IMODE(p.stat().st_mode) == mode and stat.S_IMODE(q.stat().st_mode) == mode


def test_unreadable_records_at_a_planned_name_are_moved_aside_not_overwritten(tmp_path, capsys):
    out = tmp_path / "r"
    p0, p1 = _planned(out, 0), _planned(out, 1)
    p0.parent.mkdir(parents=True)
    future = {"schema_version": 99, "task": "lra_listops", "note": "written by a newer sparsebench"}
    p0.write_text(json.dumps(future))
    p1.write_text('{"schema_version": 1, "task": "lra_lis')  # truncated by hand, or by a full disk
    before = {p0: p0.read_bytes(), p1: p1.read_bytes()}

    assert main([*SWEEP, "--seeds", "0", "1", "--out", str(out), "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    moved = [line for line in lines if "moved it aside" in line]
    assert len(moved) == 2 and "schema_version 99" in moved[0] and "not valid JSON" in moved[1]
    aside = sorted((out / ".aside" / "lra").glob("*.json"))
    assert len(aside) == 2 and sorted(a.read_bytes() for a in aside) == sorted(before.values())
    assert all(".unreadable-" in a.name for a in aside)
    for p, seed in ((p0, 0), (p1, 1)):
        assert read_record(p)["seed"] == seed  # the runs were done and written at their names
    from bench.records import load_records

    assert len(load_records(out)) == 2  # what was moved aside is never read as a record
    assert "warning" not in capsys.readouterr().out


def test_resume_checks_a_record_is_the_run_its_name_says(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*SWEEP, "--seeds", "0", "--out", str(out)]) == 0
    p0, p1 = _planned(out, 0), _planned(out, 1)
    p1.write_bytes(p0.read_bytes())  # seed 0's record under seed 1's name (a copy, a rename, a hand edit)
    capsys.readouterr()

    assert main([*SWEEP, "--seeds", "0", "1", "--out", str(out), "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("done already" in line for line in lines) == 1
    mism = [line for line in lines if "is not this run's record" in line]
    assert len(mism) == 1 and "seed 0 (name says 1)" in mism[0] and "moved it aside" in mism[0]
    assert read_record(p1)["seed"] == 1
    assert [a.name.split(".")[1].split("-")[0] for a in (out / ".aside" / "lra").glob("*.json")] == ["mismatch"]


def test_rerun_without_resume_keeps_the_previous_record(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*SWEEP, "--seeds", "0", "--out", str(out)]) == 0
    p0 = _planned(out, 0)
    old = p0.read_bytes()
    capsys.readouterr()
    assert main([*SWEEP, "--seeds", "0", "--out", str(out)]) == 0  # redone on purpose (e.g. other hardware)
    line = [x for x in capsys.readouterr().out.splitlines() if "accuracy=" in x][0]
    assert "the previous record is kept as" in line
    kept = Path(line.rsplit("kept as ", 1)[1])
    assert kept.read_bytes() == old and ".replaced-" in kept.name and kept.parent == out / ".aside" / "lra"
    assert read_record(p0)["seed"] == 0


@pytest.mark.parametrize("where, flag", [("file", "--out"), ("file/sub", "--out"), ("file", "--reports-dir")])
def test_unwritable_output_folders_fail_before_any_work(tmp_path, capsys, monkeypatch, where, flag):
    (tmp_path / "file").write_text("x")  # an existing regular file, or a folder under one
    bad = tmp_path / where
    out = bad if flag == "--out" else tmp_path / "r"
    args = [a for a in SWEEP if a != "--no-report"] + ["--seeds", "0", "--out", str(out)]
    if flag == "--reports-dir":
        args += ["--reports-dir", str(bad)]
    import bench.cli

    def no_training(*a, **k):
        raise AssertionError("a run started before the output folders were checked")

    monkeypatch.setattr(bench.cli, "run_one", no_training)  # "before any work", without a clock
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root can write anywhere")
def test_read_only_out_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main([*SWEEP, "--seeds", "0", "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert "--out" in err and "not writable" in err and len(err.strip().splitlines()) == 1


def test_a_locked_record_is_skipped_and_its_tmp_file_left_alone(tmp_path, capsys):
    """What a live sweep holds (its lock, its temporary file) another sweep neither runs nor deletes."""
    from bench.locks import RecordLock

    out = tmp_path / "r"
    p0 = _planned(out, 0)
    p0.parent.mkdir(parents=True)
    tmp = p0.parent / f".{p0.name}.{_host()}-{os.getpid()}.x1.tmp"
    tmp.write_text("{")  # being written right now by "another sweep" (this process)
    held = RecordLock(out, p0)
    assert held.acquire()
    try:
        assert main([*SWEEP, "--seeds", "0", "--out", str(out)]) == 0
    finally:
        held.release()
    assert "running in another sweep" in capsys.readouterr().out
    assert not p0.exists() and tmp.exists()

import json

import pytest

from bench.errors import BenchError
from bench.records import RunRecord, is_finished, load_records, read_record, write_record


def make_record(**kw):
    base = dict(kind="run", task="t", method="m", scale="tiny", seed=0, config={"a": 1}, config_hash="abc",
                metrics={"accuracy": 50.0}, higher_is_better={"accuracy": True}, measurements={}, budget={},
                method_info={}, env={}, git={}, date="2026-01-01T00:00:00+00:00", wall_time_s=1.0)
    base.update(kw)
    return RunRecord(**base)


def test_roundtrip_and_validation(tmp_path):
    p = write_record(make_record(), tmp_path / "r.json")
    assert read_record(p)["metrics"] == {"accuracy": 50.0}
    assert [r["task"] for r in load_records(tmp_path)] == ["t"]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.pop("config"), "missing field 'config'"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.update(seed="0"), "field 'seed' should be int"),
    (lambda d: d["higher_is_better"].clear(), "has no higher_is_better"),
])
def test_invalid_records_are_rejected(tmp_path, mutate, msg):
    p = write_record(make_record(), tmp_path / "r.json")
    d = json.loads(p.read_text())
    mutate(d)
    p.write_text(json.dumps(d))
    with pytest.raises(BenchError, match=msg):
        read_record(p)
    assert not is_finished(p)


def test_truncated_file_is_not_finished(tmp_path):
    p = write_record(make_record(), tmp_path / "r.json")
    p.write_text(p.read_text()[:50])
    assert not is_finished(p)
    with pytest.raises(BenchError, match="not valid JSON"):
        read_record(p)


def test_failed_write_leaves_old_file_intact(tmp_path):
    p = write_record(make_record(), tmp_path / "r.json")
    before = p.read_text()
    with pytest.raises(BenchError):
        write_record(make_record(metrics={"x": 1.0}), p)  # invalid: no higher_is_better for x
    assert p.read_text() == before


def test_git_commit_from_env_wins_over_a_stale_dot_git(monkeypatch):
    """A rented GPU box may get the tree with an old .git: the commit passed in the environment is the truth."""
    from bench import env

    monkeypatch.setenv("SPARSEBENCH_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("SPARSEBENCH_GIT_DIRTY", "0")
    env.git_state.cache_clear()
    try:
        assert env.git_state() == {"commit": "0123abc", "dirty": False, "source": "env"}
    finally:
        env.git_state.cache_clear()


def test_records_fingerprint_the_offline_data_they_read(tmp_path):
    """A run from --data-dir names the copy it read: sha256 prefixes of the files in the task's folder."""
    import hashlib
    from pathlib import Path

    import torch

    from bench.cli import MethodSpec, build_run_config, run_one
    from bench.records import data_fingerprint

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    fp = data_fingerprint(fixtures / "glue" / "RTE")
    assert set(fp) == {"train.tsv.xz", "dev.tsv.xz", "test.tsv.xz"}
    assert fp["dev.tsv.xz"] == hashlib.sha256((fixtures / "glue/RTE/dev.tsv.xz").read_bytes()).hexdigest()[:16]

    spec = MethodSpec("eager")
    cfg = build_run_config("glue_rte", spec, "tiny", 0, "cpu", ["train.steps=2", "train.eval_every=2"])
    rec = run_one("glue_rte", spec, 0, cfg, torch.device("cpu"), fixtures, "tiny", False)
    assert rec.budget["data_files"] == {"folder": "glue/RTE", "sha256_16": fp}


# ---- reading: one bad file never hides the others; names of planned runs are checked -----------------------------
@pytest.mark.parametrize("value", ["oops", [1, 2], {"a": 1}, True])
def test_a_malformed_metric_is_rejected(tmp_path, value):
    p = write_record(make_record(), tmp_path / "r.json")
    d = json.loads(p.read_text())
    d["metrics"]["accuracy"] = value
    p.write_text(json.dumps(d))
    with pytest.raises(BenchError, match="metric 'accuracy' is .*expected a number or null"):
        read_record(p)


def test_load_records_skips_bad_files_with_one_line_each(tmp_path, capsys):
    write_record(make_record(seed=0), tmp_path / "a" / "good.json")
    bad = json.loads((tmp_path / "a" / "good.json").read_text())
    bad["metrics"]["accuracy"] = "n/a"
    (tmp_path / "a" / "bad_metric.json").write_text(json.dumps(bad))
    (tmp_path / "a" / "truncated.json").write_text('{"schema_version": 1,\n "task"')
    (tmp_path / "a" / "future.json").write_text(json.dumps({**bad, "schema_version": 2}))
    for hidden in (".aside/a/x.unreadable-1.json", ".locks/a/good.json", "a/.hidden.json"):
        write_record(make_record(seed=9), tmp_path / hidden)
    recs = load_records(tmp_path)
    assert [r["seed"] for r in recs] == [0]
    warnings = capsys.readouterr().out.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: skipping ") for w in warnings)
    assert any("bad_metric.json" in w and "metric 'accuracy'" in w for w in warnings)
    assert any("truncated.json" in w and "not valid JSON" in w for w in warnings)
    assert any("future.json" in w and "schema_version 2" in w for w in warnings)


def test_has_records(tmp_path):
    from bench.records import has_records

    assert not has_records(tmp_path / "nope") and not has_records(tmp_path)
    (tmp_path / "x.json").write_text("{")
    assert not has_records(tmp_path)
    write_record(make_record(), tmp_path / "lra" / "r.json")
    assert has_records(tmp_path)


def test_record_state_checks_the_name_against_the_content(tmp_path):
    from bench.records import record_state

    p = tmp_path / "r.json"
    want = {"task": "t", "method": "m", "scale": "tiny", "seed": 0, "config_hash": "abc"}
    assert record_state(p, want) == ("missing", "")
    write_record(make_record(), p)
    assert record_state(p, want) == ("done", "")
    state, why = record_state(p, {**want, "seed": 1, "config_hash": "def"})
    assert state == "mismatch" and "seed 0 (name says 1)" in why and "config_hash 'abc' (name says 'def')" in why
    p.write_text(json.dumps({"schema_version": 7}))
    state, why = record_state(p, want)
    assert state == "unreadable" and "schema_version 7" in why and "\n" not in why


def test_move_aside_never_overwrites(tmp_path):
    from bench.records import move_aside

    out = tmp_path / "results"
    dests = []
    for i in range(3):
        p = out / "lra" / "r.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(str(i))
        dests.append(move_aside(p, out, "replaced"))
    assert len(set(dests)) == 3 and [d.read_text() for d in dests] == ["0", "1", "2"]
    assert all(d.parent == out / ".aside" / "lra" and d.name.startswith("r.replaced-") for d in dests)
    assert load_records(out) == []


def test_tmp_files_name_their_writer_and_only_dead_writers_debris_is_removed(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from bench import locks

    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_record(make_record(), tmp_path / "r.json")
    assert seen and seen[0].startswith(f".r.json.{locks.writer_tag()}.") and seen[0].endswith(".tmp")
    monkeypatch.undo()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = locks._host()
    live_tmp = tmp_path / f".a.json.{host}-{os.getpid()}.x.tmp"
    dead_tmp = tmp_path / "sub" / f".b.json.{host}-{dead.pid}.y.tmp"
    other_host = tmp_path / f".c.json.otherhost{host}-{dead.pid}.z.tmp"
    legacy = tmp_path / ".d.json.abc123.tmp"
    for f in (live_tmp, dead_tmp, other_host, legacy):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{")
    assert locks.remove_dead_tmp(tmp_path) == [dead_tmp]
    assert live_tmp.exists() and other_host.exists() and legacy.exists()
    # holding d.json's lock: its legacy debris (no writer named) goes too; a live writer's file never does
    assert locks.remove_record_tmp(tmp_path / "d.json") == [legacy]
    assert locks.remove_record_tmp(tmp_path / "a.json") == [] and live_tmp.exists()


def test_record_lock_is_exclusive_across_processes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from bench.locks import RecordLock, lock_path

    out, rec = tmp_path / "results", tmp_path / "results" / "lra" / "r.json"
    lk = RecordLock(out, rec)
    assert lk.acquire()
    assert lock_path(out, rec) == out / ".locks" / "lra" / "r.lock"
    probe = ("import sys; from pathlib import Path; from bench.locks import RecordLock; "
             f"sys.exit(0 if RecordLock(Path({str(out)!r}), Path({str(rec)!r})).acquire() else 3)")
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", probe], cwd=root).returncode == 3  # held by us
    lk.release()
    assert subprocess.run([sys.executable, "-c", probe], cwd=root).returncode == 0


def test_errata_are_validated(tmp_path):
    from bench.records import load_errata

    assert load_errata(tmp_path) == []
    (tmp_path / "errata.json").write_text('[{"id": 1, "records": [], "affects": "x", "note": "y"}]')
    assert load_errata(tmp_path)[0]["id"] == 1
    for text, needle in (('[{"id": 1,', "not valid JSON"), ('{"id": 1}', "expected a JSON list"),
                         ('[{"id": 1, "records": "a.json", "affects": "x", "note": "y"}]', "'records' must be a list"),
                         ('[{"records": []}]', "entry 0")):
        (tmp_path / "errata.json").write_text(text)
        with pytest.raises(BenchError, match=needle) as e:
            load_errata(tmp_path)
        assert "\n" not in str(e.value)


def test_optional_v2_fields_round_trip_and_are_absent_when_unused(tmp_path):
    """stages / operating_points / artifacts / cost: optional and additive (schema_version unchanged); a record
    that does not use them is written exactly as before, and readers tolerate their absence."""
    from bench.records import SCHEMA_VERSION, RunRecord

    plain = write_record(make_record(), tmp_path / "plain.json")
    data = json.loads(plain.read_text())
    assert not {"stages", "operating_points", "artifacts", "cost"} & set(data)
    assert RunRecord.from_dict(read_record(plain)).stages is None

    extra = dict(stages=[{"name": "dense", "kind": "train", "steps": 10}, {"name": "sparse", "kind": "train"}],
                 operating_points=[{"stage": "sweep", "point": {"density": 0.1}, "metrics": {"accuracy": 40.0}}],
                 artifacts=[{"stage": "dense", "kind": "checkpoint", "key": "ab12", "reused": True}],
                 cost={"flops": 123.0, "attention_density": 0.25})
    p = write_record(make_record(**extra), tmp_path / "v2.json")
    back = read_record(p)
    assert back["schema_version"] == SCHEMA_VERSION == 1
    for k, v in extra.items():
        assert back[k] == v
    again = RunRecord.from_dict(back)
    assert json.loads(again.to_json()) == json.loads(p.read_text())


@pytest.mark.parametrize("key, bad", [("stages", {"a": 1}), ("stages", [1, 2]), ("cost", [1]),
                                      ("operating_points", "x")])
def test_optional_fields_of_the_wrong_type_are_rejected(tmp_path, key, bad):
    p = write_record(make_record(), tmp_path / "r.json")
    d = json.loads(p.read_text())
    d[key] = bad
    p.write_text(json.dumps(d))
    with pytest.raises(BenchError, match=key):
        read_record(p)

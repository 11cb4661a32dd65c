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

"""LRA Retrieval: AAN pairs TSV loader on a tiny fixture in the release format, errors, presets, a dual-tower loss step."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from _lra_util import check_presets, one_loss_step, run_cfg
from bench.errors import DataUnavailable
from tasks.lra import retrieval as R

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "lra" / "lra_retrieval_aan"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


def _data(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "lra_retrieval_aan")
    return tmp_path


def test_fixture_loads_in_release_format(tmp_path):
    root = _data(tmp_path)
    assert R.Retrieval.data_available(root, "tiny") is None
    task = R.Retrieval(run_cfg(R.Retrieval, n_train=0, n_dev=0, n_test=0), data_dir=root)
    task.prepare()
    tr = task.splits["train"]
    assert len(tr) == 8 and tr.tokens.shape == (8, 256) and tr.tokens2.shape == (8, 256)
    assert set(tr.labels.tolist()) == {0, 1}
    first = (FIXTURE / "new_aan_pairs.train.tsv").read_bytes().split(b"\n")[0].split(b"\t")
    assert int(float(first[0])) == tr.labels[0]
    assert bytes((tr.tokens[0][tr.tokens[0] > 0] - 1).astype(np.uint8).tolist()) == first[3][:256]
    assert bytes((tr.tokens2[0][tr.tokens2[0] > 0] - 1).astype(np.uint8).tolist()) == first[4][:256]
    assert len(task.splits["dev"]) == 4 and len(task.splits["test"]) == 4


def test_unavailable_without_data(tmp_path):
    assert R.Retrieval.data_available(None, "paper").startswith("AAN data not available: pass --data-dir with lra_retrieval_aan/")
    assert "new_aan_pairs.train.tsv" in R.Retrieval.data_available(tmp_path, "small")
    task = R.Retrieval(run_cfg(R.Retrieval), data_dir=None)
    with pytest.raises(DataUnavailable, match="AAN data not available"):
        task.prepare()


@pytest.mark.parametrize("row, needle", [
    (b"1\tA\tB\tonly four", "line 2: expected 5 tab-separated columns"),
    (b"yes\tA\tB\tx\ty", "line 2: expected label 0 or 1"),
])
def test_malformed_rows_name_the_file(tmp_path, row, needle):
    p = tmp_path / "new_aan_pairs.eval.tsv"
    p.write_bytes(b"0.0\tA\tB\tsome text\tother text\n" + row + b"\n")
    with pytest.raises(DataUnavailable) as e:
        R.read_pairs_tsv(p, 100, 128)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_presets():
    check_presets(R.Retrieval)
    m, d, t, _ = R.Retrieval.presets("paper")
    assert m.dual and (m.max_len, d.max_bytes, t.batch_size, t.steps, t.lr, t.warmup_steps) == (4096, 4000, 32, 40000, 3e-4, 800)


def test_dual_tower_loss_step(tmp_path):
    cfg = run_cfg(R.Retrieval, n_train=0, n_dev=0, n_test=0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4))
    task = R.Retrieval(cfg, data_dir=_data(tmp_path))
    task.prepare()
    one_loss_step(task)

"""GLUE: TSV loaders on fixtures in the exact on-disk layouts, errors, the split protocol, metric wiring, smoke."""
import dataclasses
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.config import RunConfig
from bench.errors import DataUnavailable
from bench.method import NoConfig
from bench.registry import get_method, get_task
from tasks.glue.common import GLUE_TASKS, glue_metrics, load_glue_offline

FIX = Path(__file__).resolve().parents[1] / "fixtures"
GLUE = FIX / "glue"


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


def rows(rel):
    text = lzma.open(GLUE / (rel + ".xz"), "rt", encoding="utf-8-sig").read()
    return [ln.split("\t") for ln in text.splitlines()]


def make_task(name, data_dir=FIX, **data_over):
    T = get_task(name)
    m, d, tr, notes = T.presets("tiny")
    d = dataclasses.replace(d, **data_over)
    cfg = RunConfig(task=name, method="eager", scale="tiny", seed=0, model=m, data=d, train=tr,
                    method_cfg=NoConfig(), notes=notes)
    return T(cfg, data_dir)


@pytest.mark.parametrize("name", ["glue_cola", "glue_sst2", "glue_rte", "glue_wnli", "glue_stsb"])
def test_loaders_match_files(name):
    spec = GLUE_TASKS[name]
    got = load_glue_offline(FIX, spec)
    for split, fname in (("train", "train.tsv"), ("test", "dev.tsv")):
        r = rows(f"{spec.dir}/{fname}")
        r = r[1:] if spec.header else r
        texts, labels = got[split]
        assert len(texts) == len(r)
        if name == "glue_cola":
            assert texts[0] == (r[0][3],) and labels[0] == int(r[0][1])
        elif name == "glue_sst2":
            assert texts[0] == (r[0][0],) and labels[0] == int(r[0][1])
        elif name == "glue_stsb":
            assert texts[0] == (r[0][7], r[0][8]) and labels[0] == pytest.approx(float(r[0][9]))
        else:
            assert texts[0] == (r[0][1], r[0][2])
            assert labels == [spec.labels.index(x[3]) for x in r]
    if name == "glue_rte":
        assert spec.labels.index("entailment") == 0  # same ids as HF nyu-mll/glue


def test_mrpc_rebuilt_from_msr_files(tmp_path):
    spec = GLUE_TASKS["glue_mrpc"]
    got = load_glue_offline(FIX, spec)
    msr = rows("MRPC/msr_paraphrase_train.txt")[1:]
    dev_ids = {tuple(r) for r in rows("MRPC/dev_ids.tsv")}
    assert len(got["test"][0]) == len(dev_ids) == 10
    assert len(got["train"][0]) == len(msr) - 10 == len(rows("MRPC/train.tsv")) - 1 + 1  # train.tsv is one short
    assert got["test"][0][0] == (msr[0][3], msr[0][4]) and got["test"][1][0] == int(msr[0][0])
    # without the MSR files, train.tsv / dev.tsv are used
    d = tmp_path / "glue" / "MRPC"
    d.mkdir(parents=True)
    for f in ("train.tsv.xz", "dev.tsv.xz"):
        shutil.copy(GLUE / "MRPC" / f, d)
    got2 = load_glue_offline(tmp_path, spec)
    assert len(got2["train"][0]) == len(msr) - 11 and got2["test"] == got["test"]


def test_malformed_and_missing_files_name_the_file(tmp_path):
    d = tmp_path / "glue" / "RTE"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta .\tb .\tentailment\n1\tonly two\n")
    (d / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta .\tb .\tmaybe\n")
    with pytest.raises(DataUnavailable, match=r"RTE/train\.tsv:3: 2 tab-separated columns"):
        load_glue_offline(tmp_path, GLUE_TASKS["glue_rte"])
    (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta .\tb .\tentailment\n")
    with pytest.raises(DataUnavailable, match=r"RTE/dev\.tsv:2: label 'maybe'"):
        load_glue_offline(tmp_path, GLUE_TASKS["glue_rte"])
    (d / "dev.tsv").write_text("idx\ts1\ts2\tlabel\n")
    with pytest.raises(DataUnavailable, match=r"dev\.tsv: header has no column 'sentence1'"):
        load_glue_offline(tmp_path, GLUE_TASKS["glue_rte"])
    with pytest.raises(DataUnavailable, match=r"SST-2/train\.tsv"):
        load_glue_offline(tmp_path, GLUE_TASKS["glue_sst2"])


def test_data_available():
    assert get_task("glue_sst2").data_available(FIX, "tiny") is None
    assert get_task("glue_mrpc").data_available(FIX, "tiny") is None
    reason = get_task("glue_qnli").data_available(FIX, "tiny")
    assert "QNLI/train.tsv" in reason and "\n" not in reason
    assert "MNLI/train.tsv" in get_task("glue_mnli").data_available(FIX, "tiny")


def test_split_protocol_is_seeded_and_disjoint():
    a, b = make_task("glue_rte"), make_task("glue_rte")
    a.prepare(), b.prepare()
    n_train = len(load_glue_offline(FIX, GLUE_TASKS["glue_rte"])["train"][0])
    assert len(a.data["dev"]["labels"]) == round(0.05 * n_train)
    assert len(a.data["train"]["labels"]) + len(a.data["dev"]["labels"]) == n_train
    assert a.data["dev"]["input_ids"] == b.data["dev"]["input_ids"]
    assert not {tuple(x) for x in a.data["dev"]["input_ids"]} & {tuple(x) for x in a.data["train"]["input_ids"]}
    assert len(a.data["test"]["labels"]) == 12  # GLUE dev is our test


def test_metric_wiring_known_values():
    y = np.array([1, 0, 1, 1, 0, 1])
    p = np.array([1, 0, 0, 1, 1, 1])
    m = glue_metrics(["accuracy", "f1", "mcc"], p, y)
    tp, fp, fn = 3, 1, 1
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    tn = 1
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(100 * mcc)
    s = glue_metrics(["pearson", "spearman"], np.array([1.0, 2.0, 3.0, 5.0]), np.array([2.0, 4.0, 6.0, 10.0]))
    assert s["pearson"] == pytest.approx(100) and s["spearman"] == pytest.approx(100)
    s = glue_metrics(["spearman"], np.array([0.0, 1.0, 4.0]), np.array([3.0, 2.0, 1.0]))
    assert s["spearman"] == pytest.approx(-100)
    const = glue_metrics(["pearson", "spearman"], np.ones(4), np.arange(4.0))
    assert const == {"pearson": 0.0, "spearman": 0.0}


def test_metric_names_and_main():
    assert get_task("glue_cola").MAIN_METRIC == "mcc"
    assert get_task("glue_stsb").METRICS == {"spearman": True, "pearson": True}
    assert get_task("glue_mrpc").MAIN_METRIC == "f1" and "accuracy" in get_task("glue_mrpc").METRICS


@pytest.mark.parametrize("name", ["glue_sst2", "glue_stsb"])
def test_smoke_tiny_eager(name):
    torch.manual_seed(0)
    task = make_task(name)
    task.prepare()
    method = get_method("eager")(NoConfig(), task)
    model = task.build_model(method)
    assert len(method.cores) == 2 and not method.cores[0].spec.causal
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    assert batch["input_ids"].shape == (16, 64) and batch["attention_mask"].sum(1).min() > 2
    loss, out = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    model.eval()
    m = task.evaluate(model, "dev", 2)
    assert task.MAIN_METRIC in m and set(task.METRICS) <= set(m)
    t = task.evaluate(model, "test")
    assert t["n_examples"] == 12

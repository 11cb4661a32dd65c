"""sum_qmsum / sum_pubmed / sum_arxiv on synthetic fixtures in the exact on-disk formats; ROUGE wiring."""
import json
import lzma
import shutil
from pathlib import Path

import pytest
import torch

from bench.config import RunConfig
from bench.errors import DataUnavailable
from bench.method import NoConfig
from bench.registry import get_task, suite_tasks
from methods.dense import Eager
from tasks.mt import BOS, PAD
from tasks.summarization.common import rouge_scores
from tasks.summarization.pubmed import parse_cohan_jsonl
from tasks.summarization.qmsum import read_qmsum

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "summarization"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


def _task(name, data_dir=FIXTURE, **data_kw):
    T = get_task(name)
    model, data, train, notes = T.presets("tiny")
    data = data.__class__(**{**data.__dict__, **data_kw})
    cfg = RunConfig(task=name, method="eager", scale="tiny", seed=0, model=model, data=data, train=train,
                    method_cfg=NoConfig(), notes=notes)
    return T(cfg, data_dir)


def test_registered_with_presets():
    assert {"sum_qmsum", "sum_pubmed", "sum_arxiv"} <= set(suite_tasks("summarization"))
    for name in ("sum_qmsum", "sum_pubmed", "sum_arxiv"):
        T = get_task(name)
        assert T.MAIN_METRIC == "rougeL" and set(T.METRICS) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        for scale in ("tiny", "small", "paper"):
            model, data, train, notes = T.presets(scale)
            assert model.max_src_len % data.src_pad_multiple == 0
        assert T.presets("small")[0].max_src_len >= 2048 and T.presets("paper")[0].max_src_len >= 4096


def test_qmsum_loader_reads_tar_xz():
    meetings = read_qmsum(FIXTURE / "summarization_qmsum")
    assert {k: len(v) for k, v in meetings.items()} == {"train": 4, "val": 2, "test": 2}
    task = _task("sum_qmsum")
    src, ref = task.load_documents("train")
    assert len(src) == 4 * 3  # general + 2 specific queries per meeting
    assert src[0].startswith("Summarize the whole meeting. <sep> Project Manager: I think we")
    assert "{vocalsound}" not in src[0] and ref[0].startswith("The team discussed")
    general = _task("sum_qmsum", queries="general")
    assert len(general.load_documents("test")[0]) == 2
    raw = _task("sum_qmsum", clean_markers=False).load_documents("dev")[0]
    assert "{vocalsound}" in raw[0]


def test_qmsum_extracted_folder_and_errors(tmp_path):
    import tarfile

    root = tmp_path / "summarization_qmsum"
    root.mkdir()
    with tarfile.open(FIXTURE / "summarization_qmsum" / "qmsum_ALL.tar.xz") as tar:
        tar.extractall(root, filter="data")
    assert {k: len(v) for k, v in read_qmsum(root).items()} == {"train": 4, "val": 2, "test": 2}
    bad = sorted((root / "ALL" / "val").glob("*.json"))[0]
    bad.write_text(json.dumps({"meeting_transcripts": []}))  # missing query lists
    with pytest.raises(DataUnavailable, match=bad.name):
        _task("sum_qmsum", data_dir=tmp_path).prepare()
    bad.write_text("{not json")
    with pytest.raises(DataUnavailable, match=bad.name):
        read_qmsum(root)
    shutil.rmtree(root / "ALL")
    with pytest.raises(DataUnavailable, match="qmsum_ALL.tar.xz"):
        read_qmsum(root)
    (root / "qmsum_ALL.tar.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    with pytest.raises(DataUnavailable, match="qmsum_ALL.tar.xz"):
        read_qmsum(root)
    assert "qmsum_ALL.tar.xz" in get_task("sum_qmsum").data_available(tmp_path / "nowhere", "tiny")


def test_cohan_loader_and_errors(tmp_path):
    task = _task("sum_pubmed")
    arts, abss = task.load_documents("dev")  # validation.txt.xz
    assert len(arts) == 3 and arts[0].startswith("we studied the effect of")
    assert "<S>" not in abss[0] and abss[0].count("\n") == 1
    root = tmp_path / "summarization_pubmed_sample"
    shutil.copytree(FIXTURE / "summarization_pubmed_sample", root)
    (root / "test.txt.xz").unlink()
    assert "test.txt" in get_task("sum_pubmed").data_available(tmp_path, "tiny")
    with pytest.raises(DataUnavailable, match="test.txt"):
        _task("sum_pubmed", data_dir=tmp_path).prepare()
    (root / "test.txt").write_text('{"article_text": ["a ."], "abstract_text": ["<S> b . </S>"]}\n{"article": 1}\n')
    with pytest.raises(DataUnavailable, match=r"test\.txt: line 2"):
        _task("sum_pubmed", data_dir=tmp_path).prepare()
    (root / "test.txt").unlink()
    (root / "test.txt.xz").write_bytes(lzma.compress(b'{"article_text": "not a list", "abstract_text": []}\n'))
    with pytest.raises(DataUnavailable, match="test.txt.xz"):
        _task("sum_pubmed", data_dir=tmp_path).prepare()
    with pytest.raises(DataUnavailable, match="arxiv-dataset"):
        _task("sum_arxiv").prepare()  # not in the fixture (or the shared data): names the missing file
    arts, abss = parse_cohan_jsonl('{"article_text": ["x y ."], "abstract_text": ["<S> z . </S>", "<S> w . </S>"]}', "f")
    assert arts == ["x y ."] and abss == ["z .\nw ."]


def test_rouge_wiring_on_known_strings():
    same = rouge_scores(["the cat sat on the mat ."], ["the cat sat on the mat ."])
    assert all(v == pytest.approx(100.0) for v in same.values())
    from rouge_score import rouge_scorer

    hyp, ref = "the cats were sitting on mats\nquietly", "the cat sat on the mat\nit was quiet"
    got = rouge_scores([hyp, "nothing alike"], [ref, "totally different words"])
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expect = sc.score(ref, hyp)
    for k in got:
        assert got[k] == pytest.approx(100 * expect[k].fmeasure / 2)
    assert got["rouge1"] > 0  # stemming: cats/cat, mats/mat match
    assert rouge_scores(["a"], ["b"])["rouge1"] == 0.0


@pytest.mark.parametrize("name", ["sum_qmsum", "sum_pubmed"])
def test_smoke_prepare_loss_evaluate(name):
    task = _task(name)
    task.prepare()
    model = task.build_model(Eager(NoConfig()))
    kinds = {(c.spec.kind, c.spec.stack) for c in model.modules() if hasattr(c, "spec")}
    assert kinds == {("self", "encoder"), ("decoder_self", "decoder"), ("cross", "decoder")}
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    assert batch["src"].shape[1] % task.cfg.data.src_pad_multiple == 0
    assert batch["src"].shape[1] <= task.cfg.model.max_src_len
    assert (batch["tgt_in"][:, 0] == BOS).all() and (batch["src"][~batch["src_mask"]] == PAD).all()
    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    metrics = task.evaluate(model, "dev", 2)
    assert set(task.METRICS) <= set(metrics) and metrics["n_examples"] > 0
    test = task.evaluate(model, "test")  # beam search path
    assert set(task.METRICS) <= set(test)

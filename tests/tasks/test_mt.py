"""mt_multi30k on the synthetic fixture (exact on-disk layout of the shared Multi30k copy); BPE; BLEU wiring."""
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.config import RunConfig
from bench.errors import DataUnavailable
from bench.method import NoConfig
from bench.registry import get_task
from methods.dense import Eager
from tasks.mt import BOS, EOS, PAD, train_seq2seq_bpe
from tasks.mt.multi30k import Multi30kTranslation, corpus_bleu, read_parallel

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mt"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


def _task(data_dir=FIXTURE, **data_kw):
    model, data, train, notes = Multi30kTranslation.presets("tiny")
    data = data.__class__(**{**data.__dict__, **data_kw})
    cfg = RunConfig(task="mt_multi30k", method="eager", scale="tiny", seed=0, model=model, data=data, train=train,
                    method_cfg=NoConfig(), notes=notes)
    return Multi30kTranslation(cfg, data_dir)


def test_registered_in_mt_suite():
    from bench.registry import suite_tasks

    assert get_task("mt_multi30k") is Multi30kTranslation
    assert "mt_multi30k" in suite_tasks("mt")
    for scale in ("tiny", "small", "paper"):
        model, data, train, notes = Multi30kTranslation.presets(scale)
        assert model.d_model % model.n_heads == 0 and train.steps > 0
        assert bool(notes) == (scale != "paper")


def test_loader_reads_gz_pairs():
    de, en = read_parallel(FIXTURE / "multi30k", "train", "de", "en")
    assert len(de) == len(en) == 200
    assert de[0] == "Ein Junge tanzt im Park." and en[0] == "A boy dances in the park."
    assert Multi30kTranslation.data_available(FIXTURE, "tiny") is None


def test_missing_and_malformed_files_name_the_file(tmp_path):
    root = tmp_path / "multi30k"
    shutil.copytree(FIXTURE / "multi30k", root)
    (root / "val.en.gz").unlink()
    reason = Multi30kTranslation.data_available(tmp_path, "tiny")
    assert reason and "val.en" in reason
    with pytest.raises(DataUnavailable, match="val.en"):
        _task(tmp_path).prepare()
    # misaligned sides
    with gzip.open(root / "val.en.gz", "wt", encoding="utf-8") as f:
        f.write("only one line\n")
    with pytest.raises(DataUnavailable, match=r"val\.de.*40 lines.*val\.en.* 1"):
        read_parallel(root, "val", "de", "en")
    # corrupt gzip
    (root / "val.en.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataUnavailable, match="val.en.gz"):
        read_parallel(root, "val", "de", "en")


def test_online_only_corpora_refuse_a_data_dir():
    with pytest.raises(DataUnavailable, match="iwslt14.*without --data-dir"):
        _task(corpus="iwslt14").prepare()
    with pytest.raises(DataUnavailable, match="test_set"):
        _task(test_set="test_2099").prepare()


def test_bpe_deterministic_cached_and_lossless(tmp_path, monkeypatch):
    de, en = read_parallel(FIXTURE / "multi30k", "train", "de", "en")
    texts = de + en
    a = train_seq2seq_bpe(texts, 300)
    cached = list((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json"))
    assert len(cached) == 1
    b = train_seq2seq_bpe(texts, 300)  # from the cache
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache2"))
    c = train_seq2seq_bpe(texts, 300)  # retrained
    assert a.to_str() == b.to_str() == c.to_str()
    # a fresh process (different hash seeds) trains the same tokenizer
    code = ("import sys; from tasks.mt import train_seq2seq_bpe; from tasks.mt.multi30k import read_parallel; "
            "from pathlib import Path; de, en = read_parallel(Path(sys.argv[1]), 'train', 'de', 'en'); "
            "sys.stdout.write(train_seq2seq_bpe(de + en, 300).to_str())")
    env = {**__import__("os").environ, "SPARSEBENCH_CACHE": str(tmp_path / "cache3")}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURE / "multi30k")], capture_output=True, text=True,
                         env=env, cwd=root, check=True).stdout
    assert out == a.to_str()
    assert [a.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [PAD, BOS, EOS]
    s = "Zwei Männer lachen — äöü ß!"
    assert a.decode(a.encode(s).ids).strip() == s


def test_bleu_wiring_on_known_strings():
    refs = ["A man rides a bicycle.", "Two dogs play in the snow."]
    bleu, sig = corpus_bleu(refs, refs)
    assert bleu == pytest.approx(100.0)
    assert "tok:13a" in sig and "case:mixed" in sig
    import sacrebleu

    hyps = ["A man rides a bike.", "Two dogs are playing in snow."]
    assert corpus_bleu(hyps, refs)[0] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert corpus_bleu(["xyz qqq"] * 2, refs)[0] < 5


def test_smoke_prepare_loss_evaluate():
    task = _task()
    task.prepare()
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 200, "dev": 40, "test": 40}
    model = task.build_model(Eager(NoConfig()))
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    assert batch["src"].shape[0] == task.cfg.train.batch_size
    assert (batch["tgt_in"][:, 0] == BOS).all() and (batch["src"][batch["src_mask"]] != PAD).all()
    loss, logits = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape[-1] == task.vocab_size
    loss.backward()
    metrics = task.evaluate(model, "dev", 2)
    assert set(Multi30kTranslation.METRICS) <= set(metrics) and "loss" in metrics
    assert metrics["n_examples"] == min(2 * task.cfg.train.eval_batch_size, 40, task.cfg.data.dev_decode_max)
    assert task.bleu_signature.startswith("nrefs:1")
    assert task.batch_size_tokens(batch)[0] == task.cfg.train.batch_size


def test_short_training_learns_the_fixture():
    """A few dozen steps on the template corpus already give a non-trivial BLEU (checks the whole path)."""
    torch.manual_seed(0)
    task = _task()
    task.prepare()
    model = task.build_model(Eager(NoConfig()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    it = task.train_batches(torch.Generator().manual_seed(0))
    for _ in range(60):
        loss, _ = task.loss(model, next(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = task.evaluate(model, "test")
    assert m["n_examples"] == 40 and m["bleu"] > 20, m

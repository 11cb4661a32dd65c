"""WikiText-2: file loading (xz/gz/plain), errors naming files, BPE determinism, the perplexity protocol, smoke."""
import gzip
import lzma
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.config import RunConfig
from bench.errors import DataUnavailable
from bench.method import NoConfig
from bench.registry import get_method, get_task
from bench.text import find_file, read_text, train_bpe
from tasks.lm.wikitext import count_words, eval_windows, perplexity_metrics

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "lm"


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


def make_task(data_dir, scale="tiny", method="eager", eval_batch_size=0, **data_over):
    import dataclasses

    T = get_task("wikitext2")
    m, d, tr, notes = T.presets(scale)
    d = dataclasses.replace(d, **data_over)
    tr = dataclasses.replace(tr, eval_batch_size=eval_batch_size)
    cfg = RunConfig(task="wikitext2", method=method, scale=scale, seed=0, model=m, data=d, train=tr,
                    method_cfg=NoConfig(), notes=notes)
    return T(cfg, data_dir)


def test_read_text_plain_gz_xz(tmp_path):
    text = " = A = \n\n b c <unk> @-@ d \n"
    (tmp_path / "p.txt").write_text(text)
    with gzip.open(tmp_path / "g.txt.gz", "wt") as f:
        f.write(text)
    with lzma.open(tmp_path / "x.txt.xz", "wt") as f:
        f.write("\ufeff" + text)  # a BOM is dropped
    for name in ("p.txt", "g.txt", "x.txt"):
        assert read_text(find_file(tmp_path, name)) == text


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "bad.txt.xz").write_bytes(b"not xz at all")
    with pytest.raises(DataUnavailable, match="bad.txt.xz"):
        read_text(tmp_path / "bad.txt.xz")
    with pytest.raises(DataUnavailable, match="nothere.txt"):
        find_file(tmp_path, "nothere.txt")


def test_loader_on_fixture():
    task = make_task(FIX)
    task.prepare()
    raw = {s: lzma.open(FIX / "wikitext2" / f"{f}.txt.xz", "rt").read() for s, f in
           (("train", "train"), ("dev", "valid"), ("test", "test"))}
    for s, text in raw.items():
        assert task.n_words[s] == len(text.split()) + text.count("\n")
        # the token stream decodes back to the split's text (byte-level BPE is lossless)
        assert task.tokenizer.decode(task.ids[s].tolist()) == text


def test_missing_split_raises_naming_file(tmp_path):
    d = tmp_path / "wikitext2"
    d.mkdir()
    shutil.copy(FIX / "wikitext2" / "train.txt.xz", d)
    shutil.copy(FIX / "wikitext2" / "valid.txt.xz", d)
    T = get_task("wikitext2")
    assert "test.txt" in T.data_available(tmp_path, "tiny")
    assert T.data_available(FIX, "tiny") is None
    with pytest.raises(DataUnavailable, match=r"wikitext2/test\.txt"):
        make_task(tmp_path).prepare()


def test_offline_without_data_dir(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataUnavailable, match="offline and no --data-dir"):
        make_task(None).prepare()


def test_bpe_deterministic_and_cached(tmp_path, monkeypatch):
    text = lzma.open(FIX / "wikitext2" / "train.txt.xz", "rt").read()
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "a"))
    a = train_bpe(text, 300)
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "b"))
    b = train_bpe(text, 300)
    assert a.to_str() == b.to_str()
    files = list((tmp_path / "b" / "tokenizers").glob("*/tokenizer.json"))
    assert len(files) == 1
    assert train_bpe(text, 300).to_str() == a.to_str()  # cache hit
    assert train_bpe(text, 280).to_str() != a.to_str()  # vocab size is part of the key
    assert a.token_to_id("<pad>") == 0 and a.token_to_id("<eos>") == 1


@pytest.mark.parametrize("n,ctx,stride", [(200, 16, 0), (17, 16, 0), (16, 16, 0), (200, 16, 4), (203, 16, 16), (50, 16, 1)])
def test_eval_windows_score_every_token_once(n, ctx, stride):
    seen = []
    for start, n_in, first in eval_windows(n, ctx, stride):
        assert 1 <= n_in <= ctx and 0 <= first < n_in and start + n_in <= n - 1
        seen += [start + j + 1 for j in range(first, n_in)]
        if stride and start >= ctx:
            assert first >= ctx - stride  # at least ctx - stride tokens of context
    assert seen == list(range(1, n))


class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, tokens, key_padding_mask=None):
        return torch.zeros(*tokens.shape, self.vocab) + self.w


@pytest.mark.parametrize("stride", [0, 8])
def test_uniform_logits_give_vocab_size_perplexity(stride):
    task = make_task(FIX, eval_stride=stride, eval_batch_size=4)
    task.prepare()
    V = task.vocab_size
    m = task.evaluate(Uniform(V), "test")
    assert m["ppl_token"] == pytest.approx(V, rel=1e-6)
    n_tok, n_words = len(task.ids["test"]), task.n_words["test"]
    assert m["n_tokens"] == n_tok - 1
    assert m["ppl_word"] == pytest.approx(V ** ((n_tok - 1) / n_words), rel=1e-6)
    # a partial evaluation extrapolates at the measured per-token rate
    part = task.evaluate(Uniform(V), "test", max_batches=1)
    assert part["ppl_word"] == pytest.approx(m["ppl_word"], rel=1e-6) and part["n_tokens"] < m["n_tokens"]


def test_perplexity_metrics_values():
    m = perplexity_metrics(nll_sum=10 * math.log(7), n_scored=10, n_tokens=11, n_words=5)
    assert m["ppl_token"] == pytest.approx(7) and m["ppl_word"] == pytest.approx(49)
    assert count_words(" a b \n \n c\n") == 3 + 3


def test_smoke_tiny_eager():
    torch.manual_seed(0)
    task = make_task(FIX)
    task.prepare()
    method = get_method("eager")(NoConfig(), task)
    model = task.build_model(method)
    assert len(method.cores) == 2 and all(c.spec.causal and c.spec.stack == "decoder" for c in method.cores)
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    assert batch["tokens"].shape == (task.cfg.train.batch_size, task.cfg.data.ctx)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    loss, logits = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert task.batch_size_tokens(batch) == (batch["tokens"].shape[0], batch["tokens"].numel())
    model.eval()
    m = task.evaluate(model, "dev", 2)
    assert set(task.METRICS) <= set(m) and task.MAIN_METRIC in m
    assert 1 < m["ppl_token"] < 2 * task.vocab_size

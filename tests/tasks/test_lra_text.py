"""LRA Text: IMDB loaders on tiny fixtures in the real on-disk layouts, byte tokens, splits, presets, a loss step."""
from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest

from _lra_util import check_presets, one_loss_step, run_cfg
from bench.errors import DataUnavailable
from tasks.lra import text as T

REVIEWS = {
    ("train", "pos", 0, 9): b"Great film.<br /><br />Loved it \xc3\xa9!",
    ("train", "pos", 1, 8): b"Fine acting, superb score.",
    ("train", "neg", 2, 1): b"Dull.<br />Awful plot.",
    ("train", "neg", 3, 2): b"Not worth it at all.",
    ("test", "pos", 4, 10): b"A masterpiece.",
    ("test", "neg", 5, 3): b"Boring and long." * 30,
    ("test", "neg", 6, 4): b"Meh.",
}


def _members(split=None):
    for (s, lab, i, r), data in REVIEWS.items():
        if split is None or s == split:
            yield f"aclImdb/{s}/{lab}/{i}_{r}.txt", data
    yield f"aclImdb/{split or 'train'}/urls_pos.txt", b"http://x\n"


def _tar(path, members, mode):
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _split_xz(root):
    d = root / "lra_text_imdb"
    d.mkdir(parents=True)
    _tar(d / "aclImdb_train.tar.xz", _members("train"), "w:xz")
    _tar(d / "aclImdb_test.tar.xz", _members("test"), "w:xz")
    return root


def _prepared(root, **over):
    task = T.Text(run_cfg(T.Text, n_train=0, n_dev=0, n_test=0, **over), data_dir=root)
    task.prepare()
    return task


def test_split_tar_xz_tokens_and_splits(tmp_path):
    task = _prepared(_split_xz(tmp_path / "a"))
    tr, dev, te = task.splits["train"], task.splits["dev"], task.splits["test"]
    assert len(tr) == 4 and len(te) == 3 and tr.tokens.shape == (4, 256)
    np.testing.assert_array_equal(dev.tokens, te.tokens)  # dev = test, as LRA
    docs = {bytes((row[row > 0] - 1).astype(np.uint8).tolist()): lab for row, lab in zip(tr.tokens, tr.labels)}
    assert docs == {v: int(k[1] == "pos") for k, v in REVIEWS.items() if k[0] == "train"}  # <br /> kept, raw bytes
    long = te.tokens[te.labels == 0].max(0)
    assert (long > 0).sum() == 256  # truncated to max_bytes = 256
    assert T.Text.data_available(tmp_path / "a", "tiny") is None


def test_all_layouts_give_identical_arrays(tmp_path):
    a = _prepared(_split_xz(tmp_path / "a"))
    d = tmp_path / "b" / "lra_text_imdb"
    d.mkdir(parents=True)
    _tar(d / "aclImdb_v1.tar.gz", list(_members()) + [("aclImdb/train/unsup/9_0.txt", b"unlabelled")], "w:gz")
    b = _prepared(tmp_path / "b")
    for (s, lab, i, r), data in REVIEWS.items():
        p = tmp_path / "c" / "lra_text_imdb" / "aclImdb" / s / lab / f"{i}_{r}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    c = _prepared(tmp_path / "c")
    for split in ("train", "dev", "test"):
        for other in (b, c):
            np.testing.assert_array_equal(a.splits[split].tokens, other.splits[split].tokens)
            np.testing.assert_array_equal(a.splits[split].labels, other.splits[split].labels)


def test_truncation_and_padding_lengths(tmp_path):
    task = _prepared(_split_xz(tmp_path), max_len=64, max_bytes=50)
    te = task.splits["test"]
    assert te.tokens.shape[1] == 64 and (te.tokens > 0).sum(1).max() == 50 and te.tokens[:, 50:].max() == 0


def test_malformed_and_missing(tmp_path):
    d = tmp_path / "lra_text_imdb"
    d.mkdir()
    (d / "aclImdb_train.tar.xz").write_bytes(b"not an xz file")
    _tar(d / "aclImdb_test.tar.xz", _members("test"), "w:xz")
    with pytest.raises(DataUnavailable, match="aclImdb_train.tar.xz: not a readable tar archive"):
        _prepared(tmp_path)
    _tar(d / "aclImdb_train.tar.xz", [("aclImdb/README", b"x")], "w:xz")
    with pytest.raises(DataUnavailable, match=r"aclImdb_train.tar.xz: contains no aclImdb/train"):
        _prepared(tmp_path)
    # no files and HF offline: a one-line reason naming the folder to pass
    assert "lra_text_imdb" in T.Text.data_available(tmp_path / "empty", "tiny")
    with pytest.raises(DataUnavailable, match="lra_text_imdb"):
        _prepared(tmp_path / "empty", source="files")


def test_presets():
    check_presets(T.Text)
    m, d, t, _ = T.Text.presets("paper")
    assert (m.max_len, d.max_bytes, m.n_classes, t.batch_size, t.steps, t.lr, t.warmup_steps) == (4096, 4000, 2, 32, 30000, 1e-4, 80)


def test_loss_step(tmp_path):
    cfg = run_cfg(T.Text, n_train=0, n_dev=0, n_test=0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4))  # the fixture has 4 reviews
    task = T.Text(cfg, data_dir=_split_xz(tmp_path))
    task.prepare()
    one_loss_step(task)

"""LRA Image: CIFAR-10 image-folder tar (the shared copy's layout) read via datasets' imagefolder offline,
the TF grayscale formula, the 45k/5k-style split, presets, a loss step."""
from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from _lra_util import check_presets, one_loss_step, run_cfg
from bench.errors import DataUnavailable
from tasks.lra import image as I

N_TRAIN_PER_CLASS, N_TEST_PER_CLASS = 3, 1


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _pixels(cls: int, k: int, split: str) -> np.ndarray:
    rng = np.random.default_rng([cls, k, split == "test"])
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _make_tar(root, fmt="PNG"):
    d = root / "lra_image_cifar10"
    d.mkdir(parents=True)
    ext = ".png" if fmt == "PNG" else ".jpg"
    with tarfile.open(d / "cifar10_jpg.tar.xz", "w:xz") as tf:
        for split, n in (("train", N_TRAIN_PER_CLASS), ("test", N_TEST_PER_CLASS)):
            for c, name in enumerate(I.CLASSES):
                for k in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(_pixels(c, k, split)).save(buf, format=fmt)
                    info = tarfile.TarInfo(f"cifar10_jpg/{split}/{name}/{k:04d}{ext}")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)
    return root


def test_grayscale_formula_matches_tf():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [10, 200, 30]], np.uint8)
    expect = [int(np.floor((0.2989 * r + 0.5870 * g + 0.1140 * b) / 255 * 255.5)) for r, g, b in rgb.astype(float)]
    assert I.rgb_to_gray_tf(rgb).tolist() == expect == [76, 149, 29, 255, 0, 124]


def test_imagefolder_tar_loads_exact_pixels_and_splits(tmp_path):
    root = _make_tar(tmp_path)
    assert I.Image.data_available(root, "tiny") is None
    task = I.Image(run_cfg(I.Image, n_train=0, n_dev=10, n_test=0), data_dir=root)
    task.prepare()
    tr, dev, te = task.splits["train"], task.splits["dev"], task.splits["test"]
    assert (len(tr), len(dev), len(te)) == (20, 10, 10) and tr.tokens.shape[1] == 1024
    # files are ordered by (within-class index, class): dev = the last image of every class
    assert dev.labels.tolist() == list(range(10)) and te.labels.tolist() == list(range(10))
    assert tr.labels.tolist() == list(range(10)) * 2
    np.testing.assert_array_equal(dev.tokens[3], I.rgb_to_gray_tf(_pixels(3, 2, "train")).reshape(-1))
    np.testing.assert_array_equal(te.tokens[7], I.rgb_to_gray_tf(_pixels(7, 0, "test")).reshape(-1))
    assert task.data_notes == ()  # PNG: lossless
    assert not list((tmp_path / "cache" / "lra" / "image").glob("extracted_*"))  # extraction removed once cached


def test_jpeg_copy_is_flagged_and_loss_step(tmp_path):
    cfg = run_cfg(I.Image, n_train=0, n_dev=10, n_test=0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8))
    task = I.Image(cfg, data_dir=_make_tar(tmp_path, fmt="JPEG"))
    task.prepare()
    assert "JPEG" in task.data_notes[0]
    one_loss_step(task)


def test_malformed_and_missing(tmp_path):
    d = tmp_path / "lra_image_cifar10"
    d.mkdir()
    (d / "cifar10_jpg.tar.xz").write_bytes(b"garbage")
    task = I.Image(run_cfg(I.Image), data_dir=tmp_path)
    with pytest.raises(DataUnavailable, match="cifar10_jpg.tar.xz: not a readable tar archive"):
        task.prepare()
    assert "lra_image_cifar10" in I.Image.data_available(tmp_path / "empty", "tiny")  # HF offline
    with pytest.raises(DataUnavailable, match="lra_image_cifar10"):
        I.Image(run_cfg(I.Image, source="files"), data_dir=tmp_path / "empty").prepare()


def test_presets():
    check_presets(I.Image)
    m, d, t, _ = I.Image.presets("paper")
    assert (m.max_len, m.vocab_size, m.attention_padding_mask, d.n_train, d.n_dev) == (1024, 256, False, 45000, 5000)
    assert (t.batch_size, t.steps, t.lr, t.warmup_steps, t.eval_every, t.eval_batches) == (128, 10000, 1e-4, 175, 500, 20)

"""LRA Pathfinder: generator determinism and label/geometry consistency, release-format loader, presets, a loss step."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _lra_util import check_presets, one_loss_step, run_cfg
from bench.errors import DataUnavailable
from tasks.lra import pathfinder as P


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sample():
    return P.generate_pathfinder(120, "test", seed=0, workers=1, with_geometry=True)


def test_deterministic_prefix_and_seeded(sample):
    imgs, labels, _ = sample
    again, lab2, _ = P.generate_pathfinder(50, "test", seed=0, workers=1)
    np.testing.assert_array_equal(again, imgs[:50])
    np.testing.assert_array_equal(lab2, labels[:50])
    other, _, _ = P.generate_pathfinder(50, "test", seed=1, workers=1)
    assert not np.array_equal(other, imgs[:50])
    dev, _, _ = P.generate_pathfinder(50, "dev", seed=0, workers=1)
    assert not np.array_equal(dev, imgs[:50])


def test_worker_count_does_not_change_data():
    a = P.generate_pathfinder(P.CHUNK + 10, "train", seed=2, workers=1)
    b = P.generate_pathfinder(P.CHUNK + 10, "train", seed=2, workers=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_labels_match_geometry(sample):
    imgs, labels, geoms = sample
    assert imgs.shape == (120, 1024) and imgs.dtype == np.uint8
    assert 0.3 < labels.mean() < 0.7
    for img, label, (segs, sid, markers, mids) in zip(imgs, labels, geoms):
        # label 1 iff both markers sit on the same snake, and that snake is a target (0 or 1)
        assert (mids[0] == mids[1]) == (label == 1) and set(mids) <= {0, 1}
        for m, s in zip(markers, mids):
            snake = segs[sid == s]
            ends = np.stack([snake[0, 0], snake[-1, 1]])
            assert np.min(np.hypot(*(ends - m).T)) < 1e-9  # each marker is on an end of its snake
        if label == 1:
            snake = segs[sid == mids[0]]
            assert {tuple(snake[0, 0]), tuple(snake[-1, 1])} == {tuple(markers[0]), tuple(markers[1])}
        assert np.hypot(*(markers[0] - markers[1])) >= P.SEED_DISTANCE
        # every snake is a chain: paddles of length PADDLE_LENGTH, each starting GAP after the previous end
        for s in np.unique(sid):
            snake = segs[sid == s]
            np.testing.assert_allclose(np.hypot(*(snake[:, 1] - snake[:, 0]).T), P.PADDLE_LENGTH)
            np.testing.assert_allclose(np.hypot(*(snake[1:, 0] - snake[:-1, 1]).T), P.GAP)
        # different snakes never come closer than MIN_SEP: the only path between the markers is the target
        d = P.seg_seg_dist(segs[:, 0], segs[:, 1], segs[:, 0], segs[:, 1])
        other = sid[:, None] != sid[None, :]
        assert d[other].min() >= P.MIN_SEP - 1e-9
        assert (segs >= 0).all() and (segs <= P.WINDOW).all()
        # markers are drawn at full intensity
        pix = img.reshape(32, 32)
        for x, y in markers:
            assert pix[int(y), int(x)] >= 200


def _write_release(root, imgs, labels, per_file):
    meta = root / "metadata"
    meta.mkdir(parents=True)
    for b, start in enumerate(range(0, len(labels), per_file)):
        rows = []
        (root / "imgs" / str(b)).mkdir(parents=True)
        for i in range(start, min(start + per_file, len(labels))):
            Image.fromarray(imgs[i].reshape(32, 32)).save(root / "imgs" / str(b) / f"sample_{i}.png")
            rows.append([f"imgs/{b}", f"sample_{i}.png", str(i), str(int(labels[i])), "1.0", "14", "4", "2", "0.5", "1", "1"])
        np.save(meta / f"{b}.npy", np.array(rows))


def test_release_layout_loader(tmp_path, sample):
    imgs, labels, _ = sample
    root = tmp_path / "lra_pathfinder" / P.SUBDIR
    _write_release(root, imgs[:40], labels[:40], per_file=15)
    assert P.Pathfinder.data_available(tmp_path, "tiny") is None
    task = P.Pathfinder(run_cfg(P.Pathfinder, n_train=0, n_dev=0, n_test=0, source="files"), data_dir=tmp_path)
    task.prepare()
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [32, 4, 4]
    np.testing.assert_array_equal(task.splits["train"].tokens, imgs[:32])
    np.testing.assert_array_equal(task.splits["test"].labels, labels[36:40])
    assert task.data_notes == ()


def test_release_layout_malformed(tmp_path, sample):
    imgs, labels, _ = sample
    root = tmp_path / "lra_pathfinder" / P.SUBDIR
    _write_release(root, imgs[:10], labels[:10], per_file=10)
    (root / "imgs" / "0" / "sample_3.png").unlink()
    with pytest.raises(DataUnavailable, match="sample_3.png"):
        P.read_release(root)
    np.save(root / "metadata" / "0.npy", np.array([["imgs/0", "sample_0.png", "0", "7"]]))
    with pytest.raises(DataUnavailable, match=r"0\.npy row 0: expected label 0 or 1"):
        P.read_release(root)
    task = P.Pathfinder(run_cfg(P.Pathfinder, source="files"), data_dir=tmp_path / "nowhere")
    with pytest.raises(DataUnavailable, match="metadata"):
        task.prepare()


def test_presets():
    check_presets(P.Pathfinder)
    m, d, t, _ = P.Pathfinder.presets("paper")
    assert (m.max_len, m.attention_padding_mask, t.batch_size, t.steps, t.lr, t.eval_batches) == (1024, False, 256, 50000, 3e-4, 156)


def test_prepare_generated_and_loss(tmp_path):
    task = P.Pathfinder(run_cfg(P.Pathfinder, n_train=64, n_dev=16, n_test=16))
    task.prepare()
    assert task.splits["train"].tokens.shape == (64, 1024) and "generated" in task.data_notes[0]
    assert list((tmp_path / "cache" / "lra" / "pathfinder").glob("*.npz"))
    one_loss_step(task)

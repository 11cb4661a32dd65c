"""LRA ListOps: generator (determinism, distribution rules, true labels), TSV loader, presets, one loss step."""
from __future__ import annotations

import dataclasses
import re
import statistics

import numpy as np
import pytest
import torch

from bench.config import RunConfig
from bench.errors import DataUnavailable
from bench.method import NoConfig
from tasks.lra import listops as L


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))


def _evaluate_lra_string(s: str) -> int:
    """Independent evaluator of the LRA text form, e.g. ``( ( ( [MAX 4 ) 3 ) ] )``: parentheses are
    grouping noise; an operator collects digits until its ``]``."""
    stack: list[list] = []
    result = None
    for tok in s.replace("(", " ").replace(")", " ").split():
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            val = {
                "[MIN": lambda a: min(a),
                "[MAX": lambda a: max(a),
                "[MED": lambda a: int(statistics.median(a)),
                "[SM": lambda a: sum(a) % 10,
            }[op](args)
            if stack:
                stack[-1].append(val)
            else:
                result = val
        else:
            assert re.fullmatch(r"[0-9]", tok), tok
            stack[-1].append(int(tok))
    assert not stack and result is not None
    return result


def _depth_and_args(ids: bytes) -> tuple[int, int]:
    depth = max_depth = 0
    counts: list[int] = []
    max_args = 0
    for t in ids:
        if 11 <= t <= 14:
            if counts:
                counts[-1] += 1
            depth += 1
            counts.append(0)
            max_depth = max(max_depth, depth)
        elif t == 15:
            max_args = max(max_args, counts.pop())
            depth -= 1
        else:
            counts[-1] += 1
            max_depth = max(max_depth, depth + 1)  # a leaf sits one level below its operator
    return max_depth, max_args


def test_generator_labels_lengths_and_rules():
    gen = L.generate_listops({"test": 150, "dev": 0, "train": 0}, seed=3, min_length=40, max_length=300, workers=1)
    trees, values = gen["test"]
    assert len(trees) == 150 and len(set(trees)) == 150
    for t, v in zip(trees, values):
        assert 40 < len(t) < 300
        s = L.to_lra_string(t)
        assert _evaluate_lra_string(s) == v
        depth, n_args = _depth_and_args(t)
        assert depth <= 10 and 2 <= n_args <= 10
    assert len(set(values.tolist())) >= 5  # all four operators give varied labels


def test_generator_deterministic_and_worker_independent():
    sizes = {"test": 30, "dev": 30, "train": 700}
    a = L.generate_listops(sizes, seed=1, min_length=20, max_length=100, workers=1)
    b = L.generate_listops(sizes, seed=1, min_length=20, max_length=100, workers=2)
    c = L.generate_listops(sizes, seed=2, min_length=20, max_length=100, workers=1)
    for split in sizes:
        assert a[split][0] == b[split][0]
        np.testing.assert_array_equal(a[split][1], b[split][1])
    assert a["train"][0] != c["train"][0]
    # splits are disjoint; a smaller train request is a prefix of the larger one
    assert not set(a["train"][0]) & (set(a["dev"][0]) | set(a["test"][0]))
    small = L.generate_listops({**sizes, "train": 100}, seed=1, min_length=20, max_length=100, workers=1)
    assert small["train"][0] == a["train"][0][:100]


def test_tsv_roundtrip_and_tokens(tmp_path):
    gen = L.generate_listops({"test": 20}, seed=0, min_length=10, max_length=60, workers=1)
    trees, values = gen["test"]
    p = tmp_path / "basic_test.tsv"
    L.write_tsv(p, trees, values)
    assert p.read_text().splitlines()[0] == "Source\tTarget"
    split = L.read_tsv(p, max_len=64)
    assert split.tokens.shape == (20, 64)
    np.testing.assert_array_equal(split.labels, values)
    for row, t in zip(split.tokens, trees):
        assert bytes(row[: len(t)].tolist()) == t and not row[len(t):].any()
    assert L.VOCAB["[MIN"] == 11 and L.VOCAB["]"] == 15 and L.VOCAB["0"] == 1


def test_lra_text_example_is_tokenised_like_lra(tmp_path):
    p = tmp_path / "basic_val.tsv"
    p.write_text("Source\tTarget\n( ( ( [MAX 4 ) 3 ) ] )\t4\n( ( ( ( [SM 9 ) ( ( [MIN 1 ) 2 ) ] ) ) 5 ) ] )\t5\n")
    s = L.read_tsv(p, max_len=12)
    assert s.tokens[0].tolist()[:5] == [12, 5, 4, 15, 0]
    assert s.tokens[1].tolist()[:8] == [14, 10, 11, 2, 3, 15, 6, 15]
    assert s.labels.tolist() == [4, 5]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("Source\tTarget\n( [MAX 4 ] )\t4\n( [MIN 4 ] )\n", "line 3: expected 2 tab-separated columns"),
        ("Src\tTgt\n( [MAX 4 ] )\t4\n", "line 1: expected the header"),
        ("Source\tTarget\n( [MAX 4 ] )\tx\n", "line 2: expected an integer Target"),
        ("Source\tTarget\n( [FOO 4 ] )\t4\n", "line 2: unknown ListOps token"),
        ("Source\tTarget\n", "no examples"),
    ],
)
def test_malformed_tsv_names_file(tmp_path, content, needle):
    p = tmp_path / "basic_train.tsv"
    p.write_text(content)
    with pytest.raises(DataUnavailable) as e:
        L.read_tsv(p, max_len=16)
    assert str(p) in str(e.value) and needle in str(e.value)


def _run_cfg(scale="tiny", **data_over):
    model, data, train, notes = L.ListOps.presets(scale)
    data = dataclasses.replace(data, **data_over)
    return RunConfig(task="lra_listops", method="eager", scale=scale, seed=0, model=model, data=data,
                     train=train, method_cfg=NoConfig(), notes=notes)


def test_presets_valid():
    for scale in ("tiny", "small", "paper"):
        model, data, train, notes = L.ListOps.presets(scale)
        assert model.max_len == data.max_len and data.max_len >= data.max_length - 1
        assert model.n_classes == 10 and model.vocab_size >= L.VOCAB_SIZE
        assert train.schedule == "onecycle" and train.grad_clip_mode == "value"
        assert bool(notes) == (scale != "paper")
        assert L.ListOps.data_available(None, scale) is None
    m, d, t, _ = L.ListOps.presets("paper")
    assert (m.n_layers, m.d_model, m.max_len, t.batch_size, t.steps, t.lr, t.eval_batches) == (4, 64, 2048, 256, 30000, 7e-4, 62)


def test_files_source_missing_is_unavailable(tmp_path):
    cfg = _run_cfg(source="files")
    task = L.ListOps(cfg, data_dir=tmp_path)
    with pytest.raises(DataUnavailable, match="basic_train.tsv"):
        task.prepare()


def test_data_dir_files_are_used(tmp_path):
    folder = tmp_path / "lra_listops"
    folder.mkdir()
    gen = L.generate_listops({"test": 40, "dev": 40, "train": 80}, seed=5, min_length=10, max_length=100, workers=1)
    for split, name in L.FILE_NAMES.items():
        L.write_tsv(folder / name, *gen[split])
    task = L.ListOps(_run_cfg(n_train=0, n_dev=0, n_test=0), data_dir=tmp_path)
    task.prepare()
    assert len(task.splits["train"]) == 80
    np.testing.assert_array_equal(task.splits["dev"].labels, gen["dev"][1])


def test_prepare_caches_and_one_loss_step(tmp_path):
    from methods.dense import Eager

    cfg = _run_cfg()
    task = L.ListOps(cfg)
    task.prepare()
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [1500, 200, 200]
    assert task.splits["train"].tokens.shape[1] == 128
    files = list((tmp_path / "cache" / "lra" / "listops").glob("*.npz"))
    assert len(files) == 3
    again = L.ListOps(cfg)
    again.prepare()  # from the cache
    np.testing.assert_array_equal(again.splits["train"].tokens, task.splits["train"].tokens)
    method = Eager(NoConfig())
    model = task.build_model(method)
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    loss, logits = task.loss(model, batch)
    assert logits.shape == (32, 10) and torch.isfinite(loss)
    loss.backward()

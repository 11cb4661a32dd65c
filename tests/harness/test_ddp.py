"""One run over two processes (torchrun, gloo on CPU) equals the single-process run at the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import distributed as distmod

ROOT = Path(__file__).resolve().parents[2]
# tiny LRA ListOps (tests/harness/test_first_hour.py TINY), dropout 0, global batch 8 (4 per rank on 2 ranks)
ARGS = ["--suite", "lra", "--tasks", "listops", "--methods", "eager", "--no-progress", "train.steps=4",
        "train.eval_every=2", "data.n_train=32", "data.n_dev=16", "data.n_test=16", "model.dropout=0",
        "train.batch_size=8", "train.timing_warmup_steps=1"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _record(out: Path) -> dict:
    files = sorted((out / "lra").glob("*.json"))
    assert len(files) == 1, files  # one record, no kept earlier copy
    return json.loads(files[0].read_text())


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_only_rank0_writes(tmp_path):
    single = _run([sys.executable, str(ROOT / "run_all.py"), "--out", "single", *ARGS], tmp_path)
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                str(ROOT / "run_all.py"), "--out", "ddp", *ARGS], tmp_path)
    a, b = _record(tmp_path / "single"), _record(tmp_path / "ddp")
    # classification loss is a mean over equal halves (no padding in the reduction): the DDP gradient mean is the
    # full-batch gradient, so curves agree to float rounding
    assert len(a["history"]) == len(b["history"]) == 2
    for x, y in zip(a["history"], b["history"]):
        assert x["step"] == y["step"]
        for k in ("train_loss", "dev_loss", "dev_accuracy", "lr"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-12), k
    for k, v in a["metrics"].items():
        assert b["metrics"][k] == pytest.approx(v, rel=1e-5), k
    assert "world_size" not in a["env"] and b["env"]["world_size"] == 2
    m = b["measurements"]
    assert m["world_size"] == 2 and len(m["train_step_ms_median_per_rank"]) == 2
    assert all(t is not None and t > 0 for t in m["train_step_ms_median_per_rank"])
    assert "train_step_ms_median_per_rank" not in a["measurements"]
    # only rank 0 prints the plan/result line and the summary
    assert ddp.stdout.count("lra_listops eager seed 0: accuracy=") == 1, ddp.stdout
    assert ddp.stdout.count("records: ddp/") == 1


def test_shard_takes_contiguous_equal_rows_of_batch_tensors():
    b = {"tokens": torch.arange(16).reshape(8, 2), "labels": torch.arange(8), "scalar": torch.tensor(3.0),
         "other": torch.zeros(5), "pair": (torch.arange(8), "x")}
    s1 = distmod.shard(b, 1, 2, 8)
    assert s1["tokens"].tolist() == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert s1["labels"].tolist() == [4, 5, 6, 7] and s1["pair"][0].tolist() == [4, 5, 6, 7] and s1["pair"][1] == "x"
    assert s1["scalar"].item() == 3.0 and s1["other"].shape == (5,)
    halves = [distmod.shard(b, r, 2, 8)["labels"] for r in range(2)]
    assert torch.cat(halves).tolist() == b["labels"].tolist()


def test_not_distributed_without_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distmod.info() is None and distmod.is_main()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distmod.info() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distmod.info() == distmod.Dist(1, 1, 2) and not distmod.is_main()


def test_batch_not_divisible_by_world_size_is_one_line_error(monkeypatch):
    from bench.errors import BenchError
    from bench.train import Trainer

    class Cfg:
        class train:
            batch_size = 7

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BenchError, match="not divisible by WORLD_SIZE=2"):
        Trainer(Cfg, None, None, torch.device("cpu"))

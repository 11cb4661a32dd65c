"""Staged methods over two torchrun processes (gloo on CPU) equal their single-process runs at the same global batch.

- ``attention_pruning`` (dense -> attention statistics -> masked training) on tiny WikiText-2 (the test fixture):
  the statistics are a pass over the whole training split that every rank makes with the same weights, so they are
  the same on both ranks and equal the single-process ones; rank 0 alone writes the artifacts and the record, and a
  second run over two ranks reuses both artifacts.
- ``spion_cf`` (dense, then block-sparse layouts) on tiny generated ListOps: each rank sees half of every batch, so
  the attention maps are summed over the ranks before the transition criterion runs; both ranks switch at the same
  step with the same layouts, the single-process ones.

Both runs go through ``tests/harness/_ddp_probe.py``: ``run_all.py``'s main plus per-rank probes (what each rank
saved and its method state at the end of ``Trainer.run``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "_ddp_probe.py"
LM_FIXTURE = ROOT / "tests" / "fixtures" / "lm"

# tiny WikiText-2 from the fixture: 2-layer causal decoder, unpadded training windows (the loss is a mean over equal
# halves), global batch 8 = 4 per rank; dense 4 steps, statistics, masked 4 steps
AP_ARGS = ["--suite", "lm", "--tasks", "wikitext2", "--methods", "attention_pruning", "--data-dir", str(LM_FIXTURE),
           "--no-progress", "train.steps=4", "train.eval_every=2", "train.batch_size=8", "train.timing_warmup_steps=1",
           "train.throughput_batches=1"]
# tiny ListOps (as tests/harness/test_ddp.py), 50 steps, checks every 10: checks 1-3 (steps 9, 19, 29) do not fire,
# check 4 (step 39, an eval step) does; steps 40-49 train sparse
SPION_ARGS = ["--suite", "lra", "--tasks", "listops", "--methods", "spion_cf", "--no-progress", "train.steps=50",
              "train.eval_every=20", "method.check_every=10", "data.n_train=64", "data.n_dev=16", "data.n_test=16",
              "model.dropout=0", "train.batch_size=8", "train.timing_warmup_steps=1", "train.throughput_batches=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cwd: Path, probe: str, out: str, args: list[str], artifacts: Path, ranks: int = 1):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", SPARSEBENCH_CACHE=str(cwd / "cache"),
               SPARSEBENCH_ARTIFACTS=str(artifacts), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(_free_port())]
    # ranks left waiting on each other (a DDP hang) end themselves after PROBE_DEADLINE_S (_ddp_probe.py); torchrun
    # and anything else in its process group are killed after a longer wait
    env["PROBE_DEADLINE_S"] = "120"
    proc = subprocess.Popen([*launch, str(PROBE), probe, "--out", out, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{probe}: no result after 150 s (ranks waiting on each other?)\n{stdout[-2000:]}{stderr[-2000:]}")
    p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = p.stdout + p.stderr
    assert "Traceback" not in text and not re.search(r"\block", text, re.I), text[-3000:]  # no error, no lock trouble
    ranks_seen = [torch.load(cwd / probe / f"rank{r}.pt", weights_only=False) for r in range(ranks)]
    writes = {r: (cwd / probe / f"writes-rank{r}.txt").read_text().split("\n")[:-1]
              if (cwd / probe / f"writes-rank{r}.txt").exists() else [] for r in range(ranks)}
    return p, ranks_seen, writes


def _record(out: Path) -> dict:
    files = sorted(out.glob("*/*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _same_history(a: dict, b: dict, keys: tuple[str, ...]) -> None:
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert x["phase"] == y["phase"]
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-12), (x["step"], k)


def _check_world(rec: dict, p: subprocess.CompletedProcess, task: str, method: str) -> None:
    assert rec["env"]["world_size"] == 2 and rec["measurements"]["world_size"] == 2
    assert len(rec["measurements"]["train_step_ms_median_per_rank"]) == 2
    assert p.stdout.count(f"{task} {method} seed 0: ") == 2  # rank 0 alone prints the 'running' and result lines


def _artifact_folders(root: Path) -> dict[str, list[Path]]:
    """kind -> the artifact folders under root (debris, partial or moved-aside folders included)."""
    return {k.name: sorted(p for p in k.glob("*/*")) for k in sorted(root.iterdir()) if k.is_dir()}


@pytest.mark.slow
def test_attention_pruning_two_gloo_ranks_same_statistics_rank0_writes_and_reuses(tmp_path):
    from bench.artifacts import ArtifactStore

    p1, (single,), _ = _run(tmp_path, "p_single", "single", AP_ARGS, tmp_path / "art_single")
    p2, (r0, r1), writes = _run(tmp_path, "p_ddp", "ddp", AP_ARGS, tmp_path / "art_ddp", ranks=2)
    a, b = _record(tmp_path / "single"), _record(tmp_path / "ddp")
    _check_world(b, p2, "wikitext2", "attention_pruning")
    assert "world_size" not in a["env"]
    _same_history(a, b, ("train_loss", "dev_loss", "lr"))
    assert {h["phase"] for h in b["history"]} == {"dense", "masked"}
    for k, v in a["metrics"].items():
        assert b["metrics"][k] == pytest.approx(v, rel=1e-5), k

    # the statistics: one pass over the whole training split per rank, with the same weights -> the same bits on
    # both ranks, and the single-process statistics to float rounding (the dense weights differ by the DDP mean)
    assert r0["means"] is not None and len(r0["means"]) == len(single["means"]) == 2
    for m_single, m0, m1 in zip(single["means"], r0["means"], r1["means"]):
        assert torch.equal(m0, m1)
        torch.testing.assert_close(m0, m_single, rtol=1e-5, atol=1e-6)
    for k_single, k0, k1 in zip(single["keeps"], r0["keeps"], r1["keeps"]):
        assert torch.equal(k0, k1) and torch.equal(k0, k_single)
    drop = lambda st: {k: v for k, v in st.items() if k != "dense_checkpoint_sha256_16"}  # noqa: E731
    assert drop(b["method_info"]["statistics"]) == drop(a["method_info"]["statistics"])  # split, batches, sequences

    # rank 0 alone wrote: one dense checkpoint, one statistics artifact, its run states, the record
    assert writes[1] == []
    kinds = [w.split()[1] for w in writes[0] if w.startswith("artifact ")]
    assert sorted(k for k in kinds if k != "run_state") == ["attention_stats", "dense_checkpoint"]
    assert sum(w.startswith("record ") for w in writes[0]) == 1
    folders, single_folders = _artifact_folders(tmp_path / "art_ddp"), _artifact_folders(tmp_path / "art_single")
    store = ArtifactStore(tmp_path / "art_ddp", log=lambda s: None)
    for kind in ("dense_checkpoint", "attention_stats"):
        (d,) = folders[kind]  # one folder, no partial or moved-aside copy (``.tmp``, ``*.corrupt-*``)
        assert [x.name for x in single_folders[kind]] == [d.name]  # same key as the single-process run
        assert sorted(x.name for x in d.iterdir()) == ["meta.json", "payload.pt"]
        payload, meta = store.load(kind, d.name)
        assert meta["run"].startswith("wikitext2/attention_pruning/s0/")
    stats, _ = store.load("attention_stats", folders["attention_stats"][0].name)
    assert all(torch.equal(x, y) for x, y in zip(stats["means"], r0["means"]))
    assert folders.get("run_state", []) == []  # deleted at the end of the run
    used = {u["kind"]: u for u in b["artifacts"]}
    assert not used["dense_checkpoint"]["reused"] and not used["attention_stats"]["reused"]

    # a second run over two ranks reuses both artifacts on both ranks and writes none of them
    p3, (s0, s1), writes = _run(tmp_path, "p_reuse", "reuse", AP_ARGS, tmp_path / "art_ddp", ranks=2)
    c = _record(tmp_path / "reuse")
    used = {u["kind"]: u for u in c["artifacts"]}
    assert used["dense_checkpoint"]["reused"] and used["attention_stats"]["reused"]
    assert writes[1] == [] and not [w for w in writes[0] if w.split()[1] in ("dense_checkpoint", "attention_stats")]
    for m, m0, m1 in zip(r0["means"], s0["means"], s1["means"]):
        assert torch.equal(m, m0) and torch.equal(m, m1)
    for k, v in b["metrics"].items():
        assert c["metrics"][k] == pytest.approx(v, rel=1e-5), k
    assert _artifact_folders(tmp_path / "art_ddp") == folders


@pytest.mark.slow
def test_spion_two_gloo_ranks_switch_at_one_step_with_the_single_process_layouts(tmp_path):
    p1, (single,), _ = _run(tmp_path, "p_single", "single", SPION_ARGS, tmp_path / "art_single")
    p2, (r0, r1), writes = _run(tmp_path, "p_ddp", "ddp", SPION_ARGS, tmp_path / "art_ddp", ranks=2)
    a, b = _record(tmp_path / "single"), _record(tmp_path / "ddp")
    _check_world(b, p2, "lra_listops", "spion_cf")
    _same_history(a, b, ("train_loss", "dev_loss", "dev_accuracy", "lr"))
    for k, v in a["metrics"].items():
        assert b["metrics"][k] == pytest.approx(v, rel=1e-5), k

    # one transition: same check, same step, on both ranks and in the single-process run, before the last step
    t = single["transition_step"]
    assert t is not None and t < 49 and r0["transition_step"] == r1["transition_step"] == t
    assert r0["n_checks"] == r1["n_checks"] == single["n_checks"]
    assert r0["stages"] == r1["stages"] == ["dense", "sparse"] and r0["step"] == r1["step"] == 50
    for lay_single, l0, l1 in zip(single["layouts"], r0["layouts"], r1["layouts"]):
        assert l0 is not None and torch.equal(l0, l1) and torch.equal(l0, lay_single)
    ia, ib = a["method_info"], b["method_info"]
    assert ib["layouts"] == ia["layouts"] and ib["forced_transition"] is ia["forced_transition"] is False
    for x, y in zip(ia["delta_trace"], ib["delta_trace"], strict=True):
        assert x["step"] == y["step"] and y["delta_pct"] == pytest.approx(x["delta_pct"], rel=1e-4, abs=1e-4)
    assert b["measurements"]["train_steps_timed_by_phase"].get("sparse", 0) > 0

    # rank 0 alone wrote: its run state after the dense stage and the record
    assert writes[1] == []
    assert [w.split()[1] for w in writes[0] if w.startswith("artifact ")] == ["run_state"]
    assert sum(w.startswith("record ") for w in writes[0]) == 1

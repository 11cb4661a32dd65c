"""Harness v2 stages on a `tiny` CPU run: frozen parameters, per-stage records, artifacts shared across methods,
compute stages, operating-point sweeps, the method's own loss, and a killed multi-stage run resumed."""
import json

import pytest
import torch

from bench.artifacts import ArtifactStore
from bench.cli import build_run_config, parse_method_spec
from bench.registry import get_task
from bench.stages import Compute, Sweep, Train
from bench.train import Trainer
from methods.dense import Eager

OV = ["train.steps=12", "train.eval_every=4", "data.n_train=64", "data.n_dev=16", "data.n_test=16", "train.batch_size=16"]


def _run(method_cls, tmp_path, overrides=(), store=None, **attrs):
    cfg = build_run_config("lra_listops", parse_method_spec("eager"), "tiny", 0, "cpu", list(OV) + list(overrides))
    task = get_task("lra_listops")(cfg, None)
    method = method_cls(cfg.method_cfg, task)
    for k, v in attrs.items():
        setattr(method, k, v)
    store = store or ArtifactStore(tmp_path / "artifacts", log=lambda s: None)
    trainer = Trainer(cfg, task, method, torch.device("cpu"), progress=False, log=lambda s: None, artifacts=store)
    return trainer.run(), trainer, method


def _is_head(name, p):
    return "head" in name or "classifier" in name


class Counting(Eager):
    """Counts the training steps it sees per stage name."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.steps_seen = {}

    def before_step(self, trainer, step):
        self.steps_seen[trainer.phase] = self.steps_seen.get(trainer.phase, 0) + 1


class FrozenBackbone(Counting):
    def stages(self, trainer):
        return [Train("backbone_frozen", steps=6, trainable=_is_head), Train("all", steps=6)]

    def on_stage_start(self, trainer, stage):
        if stage.name == "backbone_frozen":
            self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def on_stage_end(self, trainer, stage):
        if stage.name == "backbone_frozen":
            self.after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            self.in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            self.ids = {n: id(p) for n, p in trainer.model.named_parameters()}


def test_frozen_parameters_do_not_change_and_are_not_optimised(tmp_path):
    rec, trainer, m = _run(FrozenBackbone, tmp_path)
    heads = [n for n in m.before if _is_head(n, None)]
    assert heads and len(heads) < len(m.before)
    for n in m.before:
        if _is_head(n, None):
            assert not torch.equal(m.before[n], m.after[n]), n
            assert m.ids[n] in m.in_optimizer
        else:
            assert torch.equal(m.before[n], m.after[n]), n
            assert m.ids[n] not in m.in_optimizer
    s0, s1 = rec.stages
    assert (s0["name"], s0["steps_run"], s1["name"], s1["steps_run"]) == ("backbone_frozen", 6, "all", 6)
    assert s0["trainable_params"] < s1["trainable_params"] == s1["params"]
    assert s0["cost"]["flops_per_token"] > 0 and rec.cost["flops_per_token"] == s1["cost"]["flops_per_token"]
    assert m.steps_seen == {"backbone_frozen": 6, "all": 6} and rec.budget["steps_run"] == 12
    assert all(p.requires_grad for p in trainer.model.parameters())  # the last stage trained everything
    json.dumps(rec.to_dict() if hasattr(rec, "to_dict") else rec.__dict__, default=str)


class StageA(Counting):
    """Two 'methods' sharing a dense first stage; they differ after it."""

    def stages(self, trainer):
        return [Train("dense", steps=8, keep_best=True, candidate=False, artifact="dense_checkpoint"),
                Train("finetune", steps=4)]


class StageB(StageA):
    def stages(self, trainer):
        return [Train("dense", steps=8, keep_best=True, candidate=False, artifact="dense_checkpoint"),
                Train("finetune", steps=4, lr=3e-4)]


def test_a_dense_artifact_is_trained_once_and_reused_by_another_method(tmp_path):
    ra, _, ma = _run(StageA, tmp_path)
    rb, _, mb = _run(StageB, tmp_path)
    assert ma.steps_seen == {"dense": 8, "finetune": 4}
    assert mb.steps_seen == {"finetune": 4}  # the dense stage came from the cache
    (a,), (b,) = [x for x in ra.artifacts if x["stage"] == "dense"], [x for x in rb.artifacts if x["stage"] == "dense"]
    assert a["key"] == b["key"] and not a["reused"] and b["reused"]
    assert rb.budget["steps_run"] == 12 and [h["step"] for h in rb.history][:2] == [4, 8]
    assert rb.history[0].get("reused") and not rb.history[-1].get("reused")
    # reusing changes nothing: a fresh run of B into an empty cache gives the same record
    rb2, _, mb2 = _run(StageB, tmp_path / "fresh")
    assert mb2.steps_seen == {"dense": 8, "finetune": 4}
    assert rb2.metrics == rb.metrics
    assert [h["train_loss"] for h in rb2.history] == [h["train_loss"] for h in rb.history]


def test_a_corrupt_artifact_is_rebuilt_not_used(tmp_path):
    _run(StageA, tmp_path)
    for payload in (tmp_path / "artifacts" / "dense_checkpoint").rglob("payload.pt"):
        payload.write_bytes(payload.read_bytes()[:100])
    rec, _, m = _run(StageA, tmp_path)
    assert m.steps_seen == {"dense": 8, "finetune": 4}
    assert not [x for x in rec.artifacts if x["stage"] == "dense"][0]["reused"]
    assert list((tmp_path / "artifacts" / "dense_checkpoint").rglob("*.corrupt-*"))


class WithCompute(Counting):
    calls = 0

    def stages(self, trainer):
        return [Train("dense", steps=6, artifact="dense_checkpoint"),
                Compute("stats", fn=self.stats, apply=self.install, artifact="stats", artifact_key={"what": "norms"}),
                Train("finetune", steps=6),
                Sweep("scale", points=(1.0, 0.0), apply=self.scale)]

    def stats(self, trainer):
        type(self).calls += 1
        return {n: p.detach().norm().item() for n, p in trainer.model.named_parameters()}

    def install(self, trainer, payload):
        self.installed = payload

    def scale(self, trainer, point):
        self.factor = point
        return {"factor": point}

    def loss(self, trainer, batch, task_loss, output):
        self.loss_calls = getattr(self, "loss_calls", 0) + 1
        return task_loss * 1.0


def test_compute_stage_artifact_sweep_and_loss_hook(tmp_path):
    WithCompute.calls = 0
    rec, _, m = _run(WithCompute, tmp_path)
    rec2, _, m2 = _run(WithCompute, tmp_path)
    assert WithCompute.calls == 1 and m2.installed == m.installed  # cached, and applied from the cache
    assert m.loss_calls == 12 and m2.loss_calls == 6
    pts = rec.operating_points
    assert [p["point"] for p in pts] == [1.0, 0.0] and [p["facts"] for p in pts] == [{"factor": 1.0}, {"factor": 0.0}]
    assert all("dev_accuracy" in p["metrics"] and "test_accuracy" in p["metrics"] for p in pts)
    assert [s["name"] for s in rec.stages] == ["dense", "stats", "finetune"]
    assert rec.stages[1]["kind"] == "compute" and rec2.stages[1]["reused"] and not rec.stages[1]["reused"]


class Killed(Exception):
    pass


class ThreeStages(Counting):
    kill_at = None

    def stages(self, trainer):
        return [Train("a", steps=4), Compute("mark", fn=lambda t: {"mark": 7}, apply=self.install),
                Train("b", steps=4, optimizer="continue", lr_schedule="continue"), Train("c", steps=4)]

    def install(self, trainer, payload):
        self.mark = payload["mark"]

    def on_stage_start(self, trainer, stage):
        if stage.name == self.kill_at:
            raise Killed(stage.name)


def test_a_killed_multi_stage_run_resumes_after_its_last_finished_stage(tmp_path):
    full, _, _ = _run(ThreeStages, tmp_path / "uninterrupted")
    with pytest.raises(Killed):
        _run(ThreeStages, tmp_path, kill_at="c")
    rec, _, m = _run(ThreeStages, tmp_path)
    assert m.steps_seen == {"c": 4} and m.mark == 7  # a and b not redone; the compute payload re-applied
    assert rec.metrics == full.metrics
    assert [h["train_loss"] for h in rec.history] == [h["train_loss"] for h in full.history]
    assert any(e["event"] == "resumed an interrupted run" for e in rec.method_info["events"])
    assert not list((tmp_path / "artifacts").rglob("run_state/*/*/payload.pt"))  # cleaned up after the record


class EndsEarly(Counting):
    def stages(self, trainer):
        return [Train("first"), Train("second", steps="rest", optimizer="continue", lr_schedule="continue")]

    def after_step(self, trainer, step):
        if step == 4 and trainer.phase == "first":
            trainer.end_stage()


def test_a_stage_ended_early_leaves_the_rest_of_the_budget_to_the_next(tmp_path):
    rec, _, m = _run(EndsEarly, tmp_path)
    assert m.steps_seen == {"first": 5, "second": 7}
    assert [(s["name"], s["ended"]) for s in rec.stages] == [("first", "early"), ("second", "planned")]


def test_bad_stage_declarations_are_one_line_errors(tmp_path):
    from bench.errors import BenchError

    class Dup(Eager):
        def stages(self, trainer):
            return [Train("x"), Train("x")]

    class NoParams(Eager):
        def stages(self, trainer):
            return [Train("x", trainable=lambda n, p: False)]

    for cls, needle in ((Dup, "unique"), (NoParams, "trains no parameter")):
        with pytest.raises(BenchError, match=needle):
            _run(cls, tmp_path)

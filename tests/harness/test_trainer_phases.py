"""The Trainer tests each phase's best checkpoint when a method switches phase (spion.md pitfall 12)."""
import torch

from bench.cli import build_run_config, parse_method_spec
from bench.registry import get_task
from bench.stages import Train
from bench.train import Trainer
from methods.dense import Eager


class TwoPhase(Eager):
    family = "learned_pattern"

    def stages(self, trainer):
        return [Train("a", steps=20), Train("b", steps=20, optimizer="continue", lr_schedule="continue")]


def test_each_phase_best_checkpoint_is_tested(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path))
    cfg = build_run_config("lra_listops", parse_method_spec("eager"), "tiny", 0, "cpu",
                           ["train.steps=40", "train.eval_every=10", "data.n_train=200", "data.n_dev=40", "data.n_test=40"])
    task = get_task("lra_listops")(cfg, None)
    rec = Trainer(cfg, task, TwoPhase(cfg.method_cfg, task), torch.device("cpu"), progress=False, log=lambda s: None).run()
    best = rec.method_info["best_checkpoint"]["phase"]
    other = {"a": "b", "b": "a"}[best]
    assert set(rec.method_info["best_checkpoint_by_phase"]) == {other}
    assert f"accuracy_best_{other}" in rec.metrics and rec.higher_is_better[f"accuracy_best_{other}"] is True
    assert set(rec.measurements["train_step_ms_median_by_phase"]) == {"a", "b"}

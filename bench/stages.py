"""The stages a method's run is made of, in order (``Method.stages(trainer)``); ``bench/train.py`` runs them.

- ``Train``: optimise for some steps with its own optimizer, LR schedule and frozen parameters. Its best dev
  checkpoint may become the run's reported one (``candidate``); with ``artifact`` its final weights are cached, keyed
  by everything that produced them, so another method (or a rerun after a crash) starts from them without training.
- ``Compute``: a function of the trained model (attention statistics, a mask, an expert split); with ``artifact``
  its output is cached the same way. ``apply`` installs the (fresh or cached) output into the model.
- ``Sweep``: evaluate the final model at several operating points (AP's tau, DSTI's tau, SEA's k): one record
  holds the quality-vs-cost curve.

Steps are counted globally over the run (``trainer.step``): eval cadence, logs and the step-time statistics use
the global step; a stage's own budget is ``steps``. ``steps=None`` or ``"rest"`` runs until the run's ``train.steps`` are used
(the run's budget is ``train.steps`` if any stage says so, else the sum of the stages' steps). A training stage may
end early: ``trainer.end_stage()`` from a hook ends it after the current step (SPION's dense stage).

A stage whose ``artifact`` output is cached is skipped and its output restored; ``artifact_key`` must name whatever
of the method's configuration changes that output (the method's name never enters the key, so methods declaring the
same stage share it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Train:
    name: str = "train"
    steps: int | str | None = None  # None or "rest": what the run's budget has left
    lr: float | None = None  # None: train.lr
    schedule: str | None = None  # None: train.schedule
    warmup_steps: int | None = None  # None: train.warmup_steps
    optimizer: str = "new"  # new | continue (keep the previous stage's optimizer and its state)
    lr_schedule: str = "new"  # new | continue (keep the previous stage's scheduler running)
    schedule_steps: int | None = None  # length of a new schedule; None: this stage's steps
    trainable: Callable[[str, Any], bool] | None = None  # (name, param) -> train it?; None: every parameter
    candidate: bool = True  # its best dev checkpoint may be the run's reported checkpoint
    keep_best: bool = False  # reload this stage's best dev checkpoint when it ends (the next stage starts there)
    artifact: str | None = None  # cache the final weights under this kind ("dense_checkpoint", ...)
    artifact_key: dict = field(default_factory=dict)  # what else identifies those weights (e.g. the activation)
    eval_at_end: bool = True  # evaluate after the stage's last planned step (always at the run's last step)


@dataclass(frozen=True)
class Compute:
    name: str
    fn: Callable[[Any], Any]  # (trainer) -> payload (torch.save-able) or None
    apply: Callable[[Any, Any], None] | None = None  # (trainer, payload): install it into the model / method
    artifact: str | None = None  # cache the payload under this kind ("attention_stats", "expert_split", ...)
    artifact_key: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    name: str
    points: tuple  # operating points, each a dict (e.g. {"tau": 0.9}) or a scalar
    apply: Callable[[Any, Any], dict | None]  # (trainer, point) -> facts for that point's cost entry (or None)
    splits: tuple[str, ...] = ("dev", "test")
    eval_batches: int = 0  # per split and point; 0 = whole split


def trainable_names(model, stage: Train) -> Iterable[str]:
    return [n for n, p in model.named_parameters() if stage.trainable is None or stage.trainable(n, p)]

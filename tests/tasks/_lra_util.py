"""Shared helpers for the LRA task tests."""
from __future__ import annotations

import dataclasses

import torch

from bench.config import RunConfig
from bench.method import NoConfig


def run_cfg(task_cls, scale: str = "tiny", **data_over) -> RunConfig:
    model, data, train, notes = task_cls.presets(scale)
    return RunConfig(task=task_cls.name, method="eager", scale=scale, seed=0, model=model,
                     data=dataclasses.replace(data, **data_over), train=train, method_cfg=NoConfig(), notes=notes)


def one_loss_step(task) -> torch.Tensor:
    from methods.dense import Eager

    model = task.build_model(Eager(NoConfig()))
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    loss, logits = task.loss(model, batch)
    assert logits.shape == (len(batch["labels"]), task.cfg.model.n_classes)
    assert torch.isfinite(loss)
    loss.backward()
    return loss


def check_presets(task_cls) -> None:
    for scale in ("tiny", "small", "paper"):
        model, data, train, notes = task_cls.presets(scale)
        assert model.max_len == data.max_len
        assert train.schedule == "onecycle" and train.grad_clip_mode == "value" and train.adam_eps == 1e-6
        assert bool(notes) == (scale != "paper")
        assert train.eval_every > 0 and train.steps > 0 and train.batch_size > 0

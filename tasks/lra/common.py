"""Shared machinery of the LRA classification tasks: arrays in, batches out, accuracy.

A task file only says where its examples come from (``load_split``) and its presets; everything else
(batching, the encoder, loss, accuracy) is here, so all five tasks train and measure identically.
Token id 0 is padding everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.config import TrainConfig
from bench.models.lra_encoder import LRAEncoder, LRAModelConfig
from bench.task import Task

# ---- the ``published`` scale: the lineage of the PyTorch re-runs (benchmarks_and_baselines.md 1.2) -----------
# Nystromformer's LRA/code/lra_config.py + run_tasks.py (mlpen/Nystromformer; the Skyformer re-runs use the same
# architecture): 2 layers, emb 64, FFN 128, 2 heads x 32, learned positions, MEAN pooling after LN(x) * mask,
# dropout 0.1; AdamW (0.9, 0.999), eps 1e-6, wd 0, no gradient clipping; OneCycleLR(max_lr = lr, pct_start =
# warmup / steps, linear anneal); eval every ``eval_frequency`` steps on ``num_eval_steps`` dev batches of the
# training batch size, best dev checkpoint tested. Its padding mask is ``input_ids != 0`` in attention for every
# task (Image and Pathfinder included: pixel value 0 is masked), and its lengths are padded to a power of two.
# Per task: (batch, steps, warm-up, eval_frequency, num_eval_steps, lr).
PUBLISHED_BUDGETS = {
    "listops": (32, 5000, 1000, 50, 62, 1e-4),
    "text": (32, 20000, 8000, 500, 781, 1e-4),
    "retrieval": (32, 30000, 800, 300, 565, 1e-4),
    "image": (256, 35000, 175, 175, 20, 1e-4),
    "pathfinder": (256, 62400, 312, 312, 312, 1e-4),
}
PUBLISHED_NOTE = (
    "published lineage: the PyTorch LRA re-runs' config (Nystromformer LRA/code/lra_config.py, "
    "benchmarks_and_baselines.md 1.2), not SPION's table (scale paper); deviations: bf16 autocast on CUDA where "
    "the original ran fp16 autocast + GradScaler with attention in fp32, no attention-probability dropout "
    "(original 0.1)")


def published_model(**kw) -> LRAModelConfig:
    """The 2-layer, 64-dim model of the ``published`` lineage; ``kw``: vocab_size, n_classes, max_len, dual."""
    base = dict(n_layers=2, d_model=64, d_qkv=64, n_heads=2, d_ff=128, dropout=0.1, pooling="mean",
                attention_padding_mask=True)
    return LRAModelConfig(**{**base, **kw})


def published_train(task: str) -> TrainConfig:
    """The ``published`` lineage's training budget of LRA task ``task`` (a key of ``PUBLISHED_BUDGETS``)."""
    batch, steps, warmup, every, batches, lr = PUBLISHED_BUDGETS[task]
    return TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=warmup, schedule="onecycle",
                       weight_decay=0.0, adam_betas=(0.9, 0.999), adam_eps=1e-6, grad_clip=0.0,
                       eval_every=every, eval_batches=batches)


@dataclass
class LRASplit:
    tokens: np.ndarray  # (N, L) int, 0 = padding
    labels: np.ndarray  # (N,) int
    tokens2: np.ndarray | None = None  # Retrieval: second document

    def __len__(self) -> int:
        return len(self.labels)


class LRAClassificationTask(Task):
    ModelConfig = LRAModelConfig
    SCALES = ("tiny", "small", "paper", "published")
    METRICS = {"accuracy": True}
    MAIN_METRIC = "accuracy"
    SPLITS = ("train", "dev", "test")

    def load_split(self, split: str) -> LRASplit:
        """Return the split's arrays; raise ``DataUnavailable`` with a clear message if impossible."""
        raise NotImplementedError

    def prepare(self) -> None:
        self.splits = {s: self.load_split(s) for s in self.SPLITS}

    # ---- batches -------------------------------------------------------------------------
    def _batch(self, split: LRASplit, idx: np.ndarray) -> dict:
        tok = torch.from_numpy(split.tokens[idx].astype(np.int64))
        b = {"tokens": tok, "mask": tok != 0, "labels": torch.from_numpy(split.labels[idx].astype(np.int64))}
        if split.tokens2 is not None:
            tok2 = torch.from_numpy(split.tokens2[idx].astype(np.int64))
            b.update(tokens2=tok2, mask2=tok2 != 0)
        return b

    def train_batches(self, generator: torch.Generator) -> Iterator[dict]:
        split, bs = self.splits["train"], self.cfg.train.batch_size
        if len(split) < bs:
            raise ValueError(f"train split has {len(split)} examples, fewer than batch_size={bs}")
        while True:  # epochs of a seeded permutation, last partial batch dropped
            perm = torch.randperm(len(split), generator=generator).numpy()
            for i in range(0, len(perm) - bs + 1, bs):
                yield self._batch(split, perm[i : i + bs])

    def eval_batches(self, split_name: str) -> Iterable[dict]:
        split = self.splits[split_name]
        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        for i in range(0, len(split), bs):
            yield self._batch(split, np.arange(i, min(i + bs, len(split))))

    def batch_size_tokens(self, batch: dict) -> tuple[int, int]:
        n = batch["tokens"].shape[0] * (2 if "tokens2" in batch else 1)
        return n, n * batch["tokens"].shape[1]

    # ---- model, loss, metrics ------------------------------------------------------------
    def build_model(self, method) -> LRAEncoder:
        return LRAEncoder(self.cfg.model, method)

    def _forward(self, model, batch: dict) -> torch.Tensor:
        return model(batch["tokens"], batch["mask"], batch.get("tokens2"), batch.get("mask2"))

    def loss(self, model, batch: dict):
        logits = self._forward(model, batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    @torch.no_grad()
    def evaluate(self, model, split: str, max_batches: int = 0) -> dict[str, float]:
        device = next(model.parameters()).device
        correct = total = 0
        loss_sum = 0.0
        for i, batch in enumerate(self.eval_batches(split)):
            if max_batches and i >= max_batches:
                break
            batch = self.to_device(batch, device)
            logits = self._forward(model, batch).float()
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
        return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "n_examples": total}

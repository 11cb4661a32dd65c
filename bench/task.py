"""The task interface: data, the backbone (built with a method's attention), loss and metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from bench.attention import note_host_mask
from bench.config import TrainConfig


class Task:
    """Base class. A task file subclasses it and registers with ``@register_task(name, suite=...)``.

    Subclasses define ``ModelConfig`` and ``DataConfig`` (frozen dataclasses), ``METRICS`` (name ->
    higher_is_better), ``MAIN_METRIC``, ``presets(scale)`` and the data/model/loss methods below.
    """

    name: str = "?"
    suite: str | None = None
    ModelConfig: type
    DataConfig: type
    METRICS: dict[str, bool] = {}
    MAIN_METRIC: str = ""
    REFERENCE: dict[str, float] = {}  # published dense numbers for the report: column label -> value
    DATA_FOLDER: str | None = None  # its folder under --data-dir; records fingerprint the files in it
    SCALES: tuple[str, ...] = ("tiny", "small", "paper")  # the scales ``presets`` knows (``bench.config.SCALES``)

    def __init__(self, cfg: Any, data_dir: Path | None = None):
        self.cfg = cfg  # RunConfig
        self.data_dir = Path(data_dir) if data_dir else None

    @classmethod
    def presets(cls, scale: str) -> tuple[Any, Any, TrainConfig, tuple[str, ...]]:
        """(model_cfg, data_cfg, train_cfg, notes) for ``scale`` (one of ``SCALES``); notes say how the budget
        differs from the paper's (empty for ``paper``) or, for ``published``, which lineage it is."""
        raise NotImplementedError

    @classmethod
    def data_folder(cls, scale: str) -> str | None:
        """The folder under ``--data-dir`` this task reads offline (None: generated or online only)."""
        return cls.DATA_FOLDER

    @classmethod
    def data_available(cls, data_dir: Path | None, scale: str) -> str | None:
        """None if data can be had (generated, found locally, or downloadable), else a one-line reason."""
        return None

    @classmethod
    def data_dir_problem(cls, data_dir: Path | None, cfg: Any) -> str | None:
        """A one-line reason why ``--data-dir`` cannot be used as given for this run config, else None.

        The rule for tasks that could also generate or download their data: if ``data_dir/<their folder>/`` exists
        but holds no usable files, that is an error (say so, and to fix or remove the folder), never a silent fallback
        to generated or downloaded data (the record would fingerprint a folder it never read). Tasks that only read
        files report missing ones in ``data_available`` and ``prepare``."""
        return None

    def data_dir_used(self) -> bool:
        """After ``prepare()``: did this run read its data from ``--data-dir``? (Then the record fingerprints the
        task's folder there.) Default: a data dir was given and the task's folder exists in it; tasks that can fall
        back to generated or downloaded data (or are told to, ``data.source=generate``) override this."""
        folder = self.data_folder(self.cfg.scale) if self.data_dir is not None else None
        return bool(folder) and (self.data_dir / folder).is_dir()

    def prepare(self) -> None:
        """Load or generate the data; raise ``DataUnavailable`` with a message that says what to do."""

    def train_batches(self, generator: torch.Generator) -> Iterator[Any]:
        raise NotImplementedError

    def eval_batches(self, split: str) -> Iterable[Any]:
        raise NotImplementedError

    def build_model(self, method: Any) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """(scalar loss, model output)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, max_batches: int = 0) -> dict[str, float]:
        raise NotImplementedError

    def batch_size_tokens(self, batch: Any) -> tuple[int, int]:
        """(sequences, tokens) in a batch, for throughput."""
        raise NotImplementedError

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch on ``device``. What ``bench.attention.has_padding`` will ask about each bool tensor (a padding
        mask) is read here, on the host, so that the attention layers never sync to ask it (issue 15)."""
        if isinstance(batch, dict):
            return {k: (_moved(v, device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(_moved(v, device) if torch.is_tensor(v) else v for v in batch)
        return batch.to(device)


def _moved(v: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = v.to(device, non_blocking=True)
    if v.dtype == torch.bool:
        note_host_mask(out, v)
    return out

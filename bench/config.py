"""Frozen dataclass configs, scale presets and ``key=value`` overrides.

Every run is described by one ``RunConfig``; its fully resolved ``to_dict()`` is embedded in the run's
record, and ``config_hash`` names the record file, so two runs differing in any setting never collide.
Scales: ``tiny`` (CPU, minutes; used by tests and as the default without a GPU), ``small`` (one GPU,
minutes per run; a reduced budget that records say is reduced), ``paper`` (the published setup).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError

CONFIG_VERSION = 1
SCALES = ("tiny", "small", "paper")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    schedule: str = "linear"  # linear | cosine | rsqrt | constant | onecycle
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    grad_clip_mode: str = "norm"  # norm | value
    eval_every: int = 100
    eval_batches: int = 0  # dev batches per periodic eval; 0 = the whole dev split
    eval_batch_size: int = 0  # 0 = batch_size
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    timing_warmup_steps: int = 5  # steps excluded from the step-time statistics
    throughput_batches: int = 5  # batches timed for inference throughput


@dataclass(frozen=True)
class RunConfig:
    task: str
    method: str
    scale: str
    seed: int
    model: Any  # the task's model config dataclass
    data: Any  # the task's data config dataclass
    train: TrainConfig
    method_cfg: Any  # the method's config dataclass
    device: str = "cpu"
    version: int = CONFIG_VERSION
    notes: tuple[str, ...] = field(default_factory=tuple)  # deviations from the paper budget, etc.

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def hash(self) -> str:
        return config_hash(self)


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes results (device excluded: a CPU and a GPU run of one config
    are the same experiment on different hardware, and records carry the hardware anyway)."""
    d = to_dict(cfg)
    d.pop("device", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _convert(value: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return value
        if origin is tuple:
            args = typing.get_args(typ)
            parts = [p for p in value.strip("()[]").split(",") if p.strip()]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(p.strip(), args[0], key) for p in parts)
            if len(parts) != len(args):
                raise ValueError
            return tuple(_convert(p.strip(), a, key) for p, a in zip(parts, args))
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(typ) if a is not type(None)]
            if value.lower() in ("none", "null") and len(args) < len(typing.get_args(typ)):
                return None
            return _convert(value, args[0], key)
        if typ is Any:
            return json.loads(value) if value[:1] in "[{0123456789-" else value
    except ValueError:
        pass
    else:
        raise BenchError(f"override {key}: cannot handle type {typ!r}")
    raise BenchError(f"invalid value for {key}: {value!r} is not a {getattr(typ, '__name__', typ)}")


def _replace_path(cfg: Any, path: list[str], value: str, full_key: str) -> Any:
    if not dataclasses.is_dataclass(cfg):
        raise BenchError(f"invalid override key {full_key!r}: {'.'.join(path)} is not a config section")
    names = {f.name for f in dataclasses.fields(cfg)}
    head = path[0]
    if head not in names:
        raise BenchError(
            f"invalid override key {full_key!r}: {type(cfg).__name__} has no field {head!r}; "
            f"valid: {', '.join(sorted(names))}"
        )
    if len(path) > 1:
        return dataclasses.replace(cfg, **{head: _replace_path(getattr(cfg, head), path[1:], value, full_key)})
    hints = typing.get_type_hints(type(cfg))
    if dataclasses.is_dataclass(getattr(cfg, head)):
        raise BenchError(f"invalid override key {full_key!r}: it names a section; set one of its fields")
    return dataclasses.replace(cfg, **{head: _convert(value, hints[head], full_key)})


# Short section names accepted on the command line: `lr=1e-3` is `train.lr=1e-3`, `method.x` is method_cfg.x.
_ALIASES = {"method": "method_cfg"}


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.field=value`` overrides (sections: model, data, train, method). A bare ``field``
    is looked up in train, model, data, method, in that order. Type-checked; unknown keys fail."""
    for item in overrides:
        if "=" not in item:
            raise BenchError(f"invalid override {item!r}: expected key=value, e.g. train.lr=3e-4")
        key, value = item.split("=", 1)
        path = key.strip().split(".")
        path[0] = _ALIASES.get(path[0], path[0])
        if len(path) == 1 and path[0] not in ("seed",):
            for section in ("train", "model", "data", "method_cfg"):
                sub = getattr(cfg, section)
                if dataclasses.is_dataclass(sub) and path[0] in {f.name for f in dataclasses.fields(sub)}:
                    path = [section, path[0]]
                    break
        cfg = _replace_path(cfg, path, value.strip(), key)
    return cfg


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (nested) config dataclass from ``to_dict`` output (tuples restored from lists)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        t = hints[f.name]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v)
        elif typing.get_origin(t) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def apply_overrides_to(cfg: Any, overrides: list[str], section: str) -> Any:
    """``field=value`` overrides on one (non-run) config dataclass, e.g. the kernel sweep grid."""
    for item in overrides:
        if "=" not in item:
            raise BenchError(f"invalid override {item!r}: expected {section}.field=value")
        key, value = item.split("=", 1)
        cfg = _replace_path(cfg, key.strip().split("."), value.strip(), f"{section}.{key}")
    return cfg

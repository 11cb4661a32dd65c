"""Frozen dataclass configs, scale presets and ``key=value`` overrides.

Every run is described by one ``RunConfig``; its fully resolved ``to_dict()`` is embedded in the run's
record, and ``config_hash`` names the record file, so two runs differing in any setting never collide.
Scales: ``tiny`` (CPU, minutes; used by tests and as the default without a GPU), ``small`` (one GPU,
minutes per run; a reduced budget that records say is reduced), ``paper`` (the published setup; LRA: SPION's
table), ``published`` (LRA only: the config lineage of the PyTorch re-runs that reach the published accuracy,
``benchmarks_and_baselines.md`` 1.2). A task lists the scales it has in ``Task.SCALES``; ``paper`` and
``published`` are full budgets (``FULL_BUDGET_SCALES``), the others reduced ones.

Validation: a setting with no meaning is a ``BenchError`` naming the key before any work is done. ``TrainConfig``
checks itself (``__post_init__``); every other section (the task's model and data configs, the method's config)
gets generic checks after the overrides are applied (``validate_run_config``): float fields must be finite, counts
(``n_*``, ``*_steps``, ``*_blocks``, ``*_size``, seeds...) non-negative, sizes such as ``n_layers``, ``n_heads``,
``d_model`` and ``max_len`` at least 1, ``n_heads`` dividing ``d_qkv`` (or ``d_model``), dropouts in [0, 1),
``data.max_len`` at most ``model.max_len``; then a section's own ``validate()``, if it defines one, is called. An
override is parsed strictly too (``_convert``): no NaN/inf floats, no negative ints. A field that means something
at those values says so in its metadata: ``field(..., metadata={"nonfinite_ok": True})`` / ``{"negative_ok": True}``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError

CONFIG_VERSION = 1
SCALES = ("tiny", "small", "paper", "published")
FULL_BUDGET_SCALES = ("paper", "published")  # records of these scales are not a reduced budget
SCALE_HELP = {
    "tiny": "CPU smoke test, minutes",
    "small": "one GPU, minutes per run, a reduced budget",
    "paper": "the published setup of the method's paper (LRA: SPION's table)",
    "published": "LRA only: the PyTorch re-runs' config lineage (Nystromformer's LRA config) that reaches the "
                 "published accuracy",
}


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

    def __post_init__(self):
        def bad(name: str, expected: str):
            raise BenchError(f"invalid value for train.{name}: {getattr(self, name)!r}; expected {expected}")

        for name in ("steps", "batch_size", "eval_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                bad(name, "an integer >= 1")
        for name in ("warmup_steps", "eval_batches", "eval_batch_size", "timing_warmup_steps", "throughput_batches"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                bad(name, "an integer >= 0")
        if not _is_real(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            bad("lr", "a finite number > 0")
        if not _is_real(self.adam_eps) or not math.isfinite(self.adam_eps) or self.adam_eps <= 0:
            bad("adam_eps", "a finite number > 0")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v < 0:
                bad(name, "a finite number >= 0" + (" (0 disables clipping)" if name == "grad_clip" else ""))
        betas = self.adam_betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(_is_real(b) and math.isfinite(b) and 0 <= b < 1 for b in betas)):
            bad("adam_betas", "two numbers in [0, 1), e.g. 0.9,0.999")
        for name, valid in (("schedule", SCHEDULES), ("grad_clip_mode", GRAD_CLIP_MODES), ("amp", AMP_MODES)):
            if getattr(self, name) not in valid:
                bad(name, "one of " + ", ".join(valid))


SCHEDULES = ("linear", "cosine", "rsqrt", "constant", "onecycle")
GRAD_CLIP_MODES = ("norm", "value")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


def _convert(value: str, typ: Any, key: str, meta: Any = None) -> Any:
    """``value`` (command-line text) as ``typ``. Floats must be finite and ints non-negative unless the field's
    metadata allows it (``nonfinite_ok`` / ``negative_ok``): no setting of ours means anything at NaN, inf or -1."""
    meta = meta or {}
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            v = int(value)
            if v < 0 and not meta.get("negative_ok"):
                raise BenchError(f"invalid value for {key}: {value!r}; expected an integer >= 0")
            return v
        if typ is float:
            v = float(value)
            if not math.isfinite(v) and not meta.get("nonfinite_ok"):
                raise BenchError(f"invalid value for {key}: {value!r}; expected a finite number")
            return v
        if typ is str:
            return value
        if origin is tuple:
            args = typing.get_args(typ)
            parts = [p for p in value.strip("()[]").split(",") if p.strip()]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(p.strip(), args[0], key, meta) for p in parts)
            if len(parts) != len(args):
                raise ValueError
            return tuple(_convert(p.strip(), a, key, meta) for p, a in zip(parts, args))
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(typ) if a is not type(None)]
            if value.lower() in ("none", "null") and len(args) < len(typing.get_args(typ)):
                return None
            return _convert(value, args[0], key, meta)
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
    meta = next(f.metadata for f in dataclasses.fields(cfg) if f.name == head)
    new = _convert(value, hints[head], full_key, meta)
    try:
        return dataclasses.replace(cfg, **{head: new})
    except BenchError as e:  # a config's own __post_init__ check: make sure the line names the key
        msg = _one_line(e)
        raise BenchError(msg if head in msg else f"invalid value for {full_key}: {value!r} ({msg})") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise BenchError(f"invalid value for {full_key}: {value!r} ({_one_line(e) or type(e).__name__})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


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
    return validate_run_config(cfg)


# Generic field rules for the sections whose dataclasses live elsewhere (tasks, models, methods).
_SIZES = ("n_layers", "n_enc_layers", "n_dec_layers", "n_heads", "d_model", "d_qkv", "d_ff", "vocab_size",
          "n_classes", "max_len", "max_src_len", "max_tgt_len", "ctx", "block_size")
_SECTIONS = (("model", "model"), ("data", "data"), ("train", "train"), ("method_cfg", "method"))


_COUNT_PREFIXES = ("n_", "num_", "max_", "min_", "d_")
_COUNT_SUFFIXES = ("_steps", "_blocks", "_size", "_len", "_length", "_every", "_batches", "_examples", "_layers",
                   "_heads", "_depth", "_args", "_seed", "seed")


def _is_count(name: str) -> bool:
    """Fields whose name says they count or size something (``n_train``, ``window_blocks``, ``block_size``...):
    negative values of these are rejected even when they come from a preset, not only from an override."""
    return name.startswith(_COUNT_PREFIXES) or name.endswith(_COUNT_SUFFIXES) or name in _SIZES


def _check_value(v: Any, key: str, meta: Any, count: bool) -> None:
    if isinstance(v, bool):
        return
    if isinstance(v, float) and not math.isfinite(v) and not meta.get("nonfinite_ok"):
        raise BenchError(f"invalid value for {key}: {v!r}; expected a finite number")
    if count and isinstance(v, int) and v < 0 and not meta.get("negative_ok"):
        raise BenchError(f"invalid value for {key}: {v!r}; expected an integer >= 0")
    if isinstance(v, (tuple, list)):
        for x in v:
            _check_value(x, key, meta, count)


def validate_section(cfg: Any, name: str) -> None:
    """Generic checks of one config dataclass (see the module docstring), then its own ``validate()``."""
    if not dataclasses.is_dataclass(cfg):
        return
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for f in dataclasses.fields(cfg):
        v, key = values[f.name], f"{name}.{f.name}"
        _check_value(v, key, f.metadata, _is_count(f.name))
        if f.name in _SIZES and _is_int(v) and v < 1:
            raise BenchError(f"invalid value for {key}: {v!r}; expected an integer >= 1")
        if (f.name == "dropout" or f.name.endswith("_dropout") or f.name == "label_smoothing") and _is_real(v) \
                and not 0 <= v < 1:
            raise BenchError(f"invalid value for {key}: {v!r}; expected a probability in [0, 1)")
    heads = values.get("n_heads")
    width_name = "d_qkv" if "d_qkv" in values else "d_model"
    width = values.get(width_name)
    if _is_int(heads) and _is_int(width) and heads > 0 and width % heads:
        raise BenchError(f"invalid value for {name}.n_heads: {heads}; it must divide {name}.{width_name}={width}")
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except BenchError as e:
            raise BenchError(f"{name}: {_one_line(e)}") from None
        except (ValueError, TypeError, AssertionError) as e:
            raise BenchError(f"invalid {name} config: {_one_line(e) or type(e).__name__}") from None


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """Reject a run config with no meaning (``BenchError`` naming the key); returns ``cfg``. Called by
    ``apply_overrides``, so every config the command line builds is checked before any work."""
    for attr, name in _SECTIONS:
        validate_section(getattr(cfg, attr), name)
    m_len, d_len = getattr(cfg.model, "max_len", None), getattr(cfg.data, "max_len", None)
    if _is_int(m_len) and _is_int(d_len) and d_len > m_len:
        raise BenchError(f"invalid value for data.max_len: {d_len}; the model takes at most model.max_len={m_len} "
                         f"tokens (raise model.max_len too)")
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

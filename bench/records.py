"""Run records: one JSON file per run, schema-versioned, validated on read, written atomically.

A record is the only source of numbers in ``reports/``: nothing is typed in by hand. Its file name is
``<task>__<method>__<scale>__s<seed>__<confighash>.json`` under ``results/<suite>/``, so ``--resume`` can
tell from the name alone whether a run is finished, and a half-written file can never exist (the JSON
goes to a temporary file in the same directory, is fsynced, then renamed over the target).
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError

SCHEMA_VERSION = 1
NOT_RECORDS = {"errata.json"}  # files under results/ that annotate records rather than being one

REQUIRED = {
    "schema_version": int,
    "kind": str,  # "run" (train+eval) or "kernel_sweep"
    "task": str,
    "method": str,
    "scale": str,
    "seed": int,
    "config": dict,
    "config_hash": str,
    "metrics": dict,  # name -> value (final test metrics, plus dev_* for the chosen checkpoint)
    "higher_is_better": dict,  # metric name -> bool
    "measurements": dict,  # timing / memory / throughput, each with its unit in the key
    "budget": dict,  # steps_run, eval_steps_run, reduced (bool), note
    "method_info": dict,  # method-specific facts: per-layer density, transition step, layouts...
    "env": dict,
    "git": dict,
    "date": str,
    "wall_time_s": (int, float),
}


@dataclass
class RunRecord:
    kind: str
    task: str
    method: str
    scale: str
    seed: int
    config: dict
    config_hash: str
    metrics: dict
    higher_is_better: dict
    measurements: dict
    budget: dict
    method_info: dict
    env: dict
    git: dict
    date: str
    wall_time_s: float
    history: list = field(default_factory=list)  # periodic eval/train-loss points
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def record_filename(task: str, method: str, scale: str, seed: int, config_hash: str) -> str:
    return f"{task}__{method}__{scale}__s{seed}__{config_hash}.json"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_record(record: RunRecord | dict, path: Path) -> Path:
    data = asdict(record) if isinstance(record, RunRecord) else record
    validate(data, source=str(path))
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=_json_default) + "\n")
    return path


def validate(data: dict, source: str = "<record>") -> dict:
    if not isinstance(data, dict):
        raise BenchError(f"{source}: a record must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BenchError(f"{source}: schema_version {version!r}, this suite reads {SCHEMA_VERSION}")
    for key, typ in REQUIRED.items():
        if key not in data:
            raise BenchError(f"{source}: missing field {key!r}")
        if not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool)):
            raise BenchError(f"{source}: field {key!r} should be {getattr(typ, '__name__', typ)}")
    for name in data["metrics"]:
        if name not in data["higher_is_better"]:
            raise BenchError(f"{source}: metric {name!r} has no higher_is_better entry")
    return data


def read_record(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: not valid JSON ({e})") from None
    return validate(data, source=str(path))


def load_records(root: Path, strict: bool = False) -> list[dict]:
    """All valid records under ``root`` (recursively), sorted by path. Invalid files are skipped with a
    warning unless ``strict``."""
    out = []
    for p in sorted(Path(root).rglob("*.json")):
        if p.name.startswith(".") or p.name in NOT_RECORDS:
            continue
        try:
            rec = read_record(p)
        except BenchError as e:
            if strict:
                raise
            print(f"warning: skipping {e}")
            continue
        rec["_path"] = str(p)
        out.append(rec)
    return out


def is_finished(path: Path) -> bool:
    try:
        read_record(path)
    except (BenchError, OSError):
        return False
    return True


def data_fingerprint(folder: Path) -> dict[str, str]:
    """``{relative path: sha256 prefix}`` of every file under ``folder``: which copy of the data a run read.
    Hashed once per process and folder (a sweep runs many methods on one copy)."""
    return dict(_fingerprint(str(Path(folder).resolve())))


@functools.lru_cache(maxsize=32)
def _fingerprint(folder: str) -> tuple[tuple[str, str], ...]:
    import hashlib

    out = {}
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[f.relative_to(folder).as_posix()] = h.hexdigest()[:16]
    return tuple(out.items())

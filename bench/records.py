"""Run records: one JSON file per run, schema-versioned, validated on read, written atomically.

A record is the only source of numbers in ``reports/``: nothing is typed in by hand. Its file name is
``<task>__<method>__<scale>__s<seed>__<confighash>.json`` under ``results/<suite>/``, so ``--resume`` can
find a run's record by name, and a half-written file can never exist (the JSON goes to a temporary file in the same
directory, is fsynced, then renamed over the target; the file gets the user's umask like any other new file).

``--resume`` does not trust the name alone: a record counts as done only if it validates and its task, method,
scale, seed and config hash are the ones its name says (``record_state``). A file at a planned run's name that is
not such a record (unreadable: another schema_version, invalid JSON; or mismatched) is never overwritten: it is
moved aside (``move_aside``) to ``<out>/.aside/<suite>/<stem>.<why>-<UTC time>.json``, where ``load_records``
(which skips hidden folders and files) never reads it.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
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

# Optional, additive fields (schema_version 1 unchanged): absent from older records, and from a new record's JSON
# when None. Readers must tolerate their absence (``record.get("stages") or []``).
OPTIONAL = {
    "stages": list,  # one dict per stage the run went through (name, kind, steps, step time, memory...)
    "operating_points": list,  # Sweep stages: one dict per evaluated point (point, metrics, facts, cost)
    "artifacts": (list, dict),  # stage outputs loaded from / saved to the artifact cache
    "cost": dict,  # forward cost of the final model (bench/cost.py)
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
    stages: list | None = None
    operating_points: list | None = None
    artifacts: list | dict | None = None
    cost: dict | None = None

    def to_dict(self) -> dict:
        """The record as written: the optional fields (``OPTIONAL``) are left out when None, so a record that does
        not use them is byte-identical to one written before they existed."""
        return record_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, default=_json_default) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        """A RunRecord from a record dict (as ``read_record`` returns it); keys that are not fields (``_path``)
        are dropped, absent optional fields are None."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def record_dict(record: "RunRecord | dict") -> dict:
    data = asdict(record) if isinstance(record, RunRecord) else dict(record)
    for key in OPTIONAL:
        if key in data and data[key] is None:
            del data[key]
    return data


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


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, which races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, with the mode a plain ``open(path, "w")`` would give a new file (the
    user's umask; ``mkstemp`` alone makes 0600). The temporary file's name carries the writer's host and pid
    (``bench.locks``), so another sweep can tell live debris from dead."""
    from bench.locks import writer_tag

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):  # pragma: no cover - no fchmod (Windows)
            pass
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
    data = record_dict(record)
    validate(data, source=str(path))
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=_json_default) + "\n")
    return path


def write_record_keeping(record: RunRecord | dict, path: Path, out: Path) -> Path | None:
    """``write_record``, but a file already at ``path`` is first moved aside (``move_aside(..., "replaced")``), only
    once the new record has validated; returns where the old file went (None if there was none)."""
    data = record_dict(record)
    validate(data, source=str(path))
    old = move_aside(path, out, "replaced") if Path(path).exists() else None
    write_record(data, path)
    return old


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
    for key, typ in OPTIONAL.items():
        value = data.get(key)
        if value is not None and not isinstance(value, typ):
            names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise BenchError(f"{source}: optional field {key!r} should be {names} or null")
    if isinstance(data.get("stages"), list) and not all(isinstance(s, dict) for s in data["stages"]):
        raise BenchError(f"{source}: field 'stages' should be a list of objects")
    for name, value in data["metrics"].items():
        if name not in data["higher_is_better"]:
            raise BenchError(f"{source}: metric {name!r} has no higher_is_better entry")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BenchError(f"{source}: metric {name!r} is {_short(value)}; expected a number or null")
    return data


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_record(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: not valid JSON ({_one_line(e)})") from None
    except RecursionError:
        raise BenchError(f"{path}: not valid JSON (nested too deeply)") from None
    return validate(data, source=str(path))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _record_files(root: Path):
    """Candidate record files under ``root``: ``*.json``, not hidden, not under a hidden folder (``.locks/``,
    ``.aside/``), not an annotation file like ``errata.json``."""
    root = Path(root)
    for p in sorted(root.rglob("*.json")):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or p.name in NOT_RECORDS or not p.is_file():
            continue
        yield p


def load_records(root: Path, strict: bool = False) -> list[dict]:
    """All valid records under ``root`` (recursively), sorted by path. Invalid files (bad JSON, another
    schema_version, a malformed field or metric) are skipped with a one-line warning unless ``strict``: one bad
    file never hides the others."""
    out = []
    for p in _record_files(root):
        try:
            rec = read_record(p)
        except (BenchError, OSError) as e:
            if strict:
                raise
            print(f"warning: skipping {_one_line(e)}")
            continue
        rec["_path"] = str(p)
        out.append(rec)
    return out


def has_records(root: Path) -> bool:
    """Is there at least one valid record under ``root``? (Quiet; stops at the first one.)"""
    if not Path(root).is_dir():
        return False
    for p in _record_files(root):
        try:
            read_record(p)
        except (BenchError, OSError):
            continue
        return True
    return False


def is_finished(path: Path) -> bool:
    try:
        read_record(path)
    except (BenchError, OSError):
        return False
    return True


def record_state(path: Path, expected: dict | None = None) -> tuple[str, str]:
    """``(state, why)`` of the file at a planned run's name: ``("missing", "")``, ``("done", "")``,
    ``("unreadable", why)`` (invalid JSON, another schema_version, a malformed field) or ``("mismatch", why)``: a
    valid record whose fields differ from ``expected`` (e.g. ``{"task": ..., "method": ..., "scale": ..., "seed":
    ..., "config_hash": ...}``, what its name says), so it is not the run the name promises."""
    path = Path(path)
    if not path.exists():
        return "missing", ""
    try:
        data = read_record(path)
    except (BenchError, OSError) as e:
        return "unreadable", _one_line(e).replace(f"{path}: ", "")
    diff = [f"{k} {data.get(k)!r} (name says {v!r})" for k, v in (expected or {}).items() if data.get(k) != v]
    if diff:
        return "mismatch", "its " + ", ".join(diff)
    return "done", ""


def aside_path(path: Path, out: Path, why: str) -> Path:
    """Where ``move_aside`` puts ``path``: ``<out>/.aside/<dir under out>/<stem>.<why>-<UTC time>.json``."""
    path, out = Path(path), Path(out)
    try:
        rel = path.resolve().parent.relative_to(Path(out).resolve())
    except ValueError:
        rel = Path()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = out / ".aside" / rel
    dest = base / f"{path.stem}.{why}-{stamp}{path.suffix}"
    n = 1
    while dest.exists():
        n += 1
        dest = base / f"{path.stem}.{why}-{stamp}-{n}{path.suffix}"
    return dest


def move_aside(path: Path, out: Path, why: str) -> Path:
    """Move a file out of the way (never delete it) to a name ``load_records`` skips; returns the new path."""
    dest = aside_path(path, out, why)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return dest


def load_errata(results_dir: Path) -> list[dict]:
    """``<results>/errata.json`` validated: a list of objects with ``id``, ``records`` (list of paths), ``affects``
    and ``note``. A missing file is ``[]``; a malformed one raises ``BenchError`` naming the file and the entry."""
    path = Path(results_dir) / "errata.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: not valid JSON ({_one_line(e)}); fix it or move it away") from None
    if not isinstance(data, list):
        raise BenchError(f"{path}: expected a JSON list of errata, got {type(data).__name__}")
    for i, e in enumerate(data):
        if not isinstance(e, dict) or not isinstance(e.get("id"), (int, str)) or isinstance(e.get("id"), bool):
            raise BenchError(f"{path}: entry {i} must be an object with an 'id'")
        if not isinstance(e.get("records"), list) or not all(isinstance(r, str) for r in e["records"]):
            raise BenchError(f"{path}: erratum {e['id']!r}: 'records' must be a list of record paths")
        for key in ("affects", "note"):
            if not isinstance(e.get(key), str):
                raise BenchError(f"{path}: erratum {e['id']!r}: {key!r} must be a string")
    return data


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

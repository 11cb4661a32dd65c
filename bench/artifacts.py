"""On-disk cache of stage outputs: a trained dense checkpoint, attention statistics, an expert split.

An artifact is keyed by the sha256 of everything that produced it (``artifact_key``): the task, its data and model
configs, the seed, the producing stage's settings, the chain of stages before it and the method's own
``artifact_key`` -- never the method's name, so AP, SEA and DSTI declaring the same first stage share one dense
checkpoint. Layout: ``<root>/<kind>/<key[:2]>/<key>/{payload.pt, meta.json}``; ``meta.json`` holds the payload's
sha256 and is written last, so a folder without a valid ``meta.json`` is partial. A partial or corrupt artifact is
moved aside (``*.corrupt-<time>``) and rebuilt, never used. Writes go to a temporary folder renamed into place, so
concurrent producers never see each other's half-written files (the first rename wins, the second is dropped).

The root is ``$SPARSEBENCH_ARTIFACTS`` or ``~/.cache/sparsebench/artifacts`` (``run_all.py --artifacts DIR``).
Delete it to retrain everything. ``ARTIFACT_VERSION`` is bumped whenever a producer's output changes meaning.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ARTIFACT_VERSION = 1


def default_root() -> Path:
    env = os.environ.get("SPARSEBENCH_ARTIFACTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsebench" / "artifacts"


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return "nan"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def artifact_key(kind: str, parts: dict) -> str:
    blob = json.dumps({"kind": kind, "version": ARTIFACT_VERSION, **_canonical(parts)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ArtifactStore:
    def __init__(self, root: str | Path | None = None, log=print):
        self.root = Path(root) if root is not None else default_root()
        self.log = log

    def folder(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def load(self, kind: str, key: str, map_location="cpu") -> tuple[Any, dict] | None:
        """(payload, meta) of a complete, intact artifact; None if there is none. A damaged one is moved aside."""
        d = self.folder(kind, key)
        if not d.exists():
            return None
        try:
            meta = json.loads((d / "meta.json").read_text())
            blob = (d / "payload.pt").read_bytes()
            if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                raise ValueError("checksum mismatch")
            payload = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any damage means: rebuild
            aside = d.with_name(f"{d.name}.corrupt-{int(time.time())}")
            try:
                d.rename(aside)
            except OSError:
                shutil.rmtree(d, ignore_errors=True)
            self.log(f"artifact {kind}/{key[:12]} is damaged ({type(e).__name__}: {e}); moved to {aside.name}, rebuilding")
            return None
        return payload, meta

    def save(self, kind: str, key: str, payload: Any, meta: dict | None = None) -> Path:
        d = self.folder(kind, key)
        d.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(payload, buf)
        blob = buf.getvalue()
        full_meta = {"kind": kind, "key": key, "version": ARTIFACT_VERSION, "sha256": hashlib.sha256(blob).hexdigest(),
                     "bytes": len(blob), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(meta or {})}
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=d.parent))
        try:
            (tmp / "payload.pt").write_bytes(blob)
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, default=str))
            try:
                os.rename(tmp, d)
            except OSError:  # another producer won the race (or a stale folder): keep theirs if intact
                if self.load(kind, key) is None:
                    shutil.rmtree(d, ignore_errors=True)
                    os.rename(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return d

    def delete(self, kind: str, key: str) -> None:
        shutil.rmtree(self.folder(kind, key), ignore_errors=True)

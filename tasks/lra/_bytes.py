"""Helpers shared by the LRA task files: byte tokenising, padding, capping, the generated-data cache.

Token id 0 is padding everywhere. Byte-level tasks (Text, Retrieval) map byte ``b`` to ``b + 1`` so that a
NUL byte never collides with padding (ids 1..256, vocab 257).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bench.paths import cache_dir

BYTE_VOCAB = 257  # pad + 256 byte values (byte b -> id b + 1)


def byte_tokens(data: bytes, max_len: int) -> np.ndarray:
    """Bytes -> int16 ids ``b + 1``, truncated to ``max_len`` (not padded)."""
    return np.frombuffer(data[:max_len], dtype=np.uint8).astype(np.int16) + 1


def pad_sequences(seqs: Sequence[np.ndarray], max_len: int, dtype=np.int16) -> np.ndarray:
    """Right-pad (and truncate) 1-d id arrays to an (N, max_len) array, 0 = padding."""
    out = np.zeros((len(seqs), max_len), dtype=dtype)
    for i, s in enumerate(seqs):
        s = s[:max_len]
        out[i, : len(s)] = s
    return out


def cap(n_available: int, n_cap: int) -> int:
    """How many examples to keep: ``n_cap`` (0 = all), never more than available."""
    return n_available if n_cap <= 0 else min(n_cap, n_available)


def params_key(params: dict) -> str:
    """A short stable hash of generator/preprocessing parameters, for cache file names."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_file(task: str, stem: str, params: dict) -> Path:
    """``cache_dir("lra", task) / f"{stem}_{hash(params)}.npz"``; the params are stored inside too."""
    return cache_dir("lra", task) / f"{stem}_{params_key(params)}.npz"


def save_npz(path: Path, params: dict, **arrays: np.ndarray) -> None:
    """Compressed, written atomically (parallel runs may race on the same cache file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, _params=np.array(json.dumps(params, sort_keys=True, default=str)), **arrays)
    os.replace(tmp, path)


def load_npz(path: Path, params: dict) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if absent, unreadable or made with other parameters."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["_params"]) != json.dumps(params, sort_keys=True, default=str):
                return None
            return {k: z[k] for k in z.files if k != "_params"}
    except Exception:  # corrupt/partial file: regenerate
        return None


def flatten(seqs: Iterable[Sequence[int]], dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """Ragged sequences -> (flat values, offsets of length N+1), for compact caching."""
    seqs = list(seqs)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
    return flat, offsets


def unflatten_padded(flat: np.ndarray, offsets: np.ndarray, max_len: int, dtype=np.uint8) -> np.ndarray:
    """(flat, offsets) -> (N, max_len) right-padded array (truncating longer sequences)."""
    n = len(offsets) - 1
    out = np.zeros((n, max_len), dtype=dtype)
    for i in range(n):
        s = flat[offsets[i] : offsets[i + 1]][:max_len]
        out[i, : len(s)] = s
    return out

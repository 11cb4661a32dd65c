"""Where generated data and trained tokenizers are cached (never inside results/)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$SPARSEBENCH_CACHE`` (default ``~/.cache/sparsebench``) joined with ``parts``; created."""
    root = Path(os.environ.get("SPARSEBENCH_CACHE", Path.home() / ".cache" / "sparsebench"))
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p

"""The block-size rule shared by block-sparse methods (SPION and the fixed patterns), so that their layouts are
comparable on a task.

- LRA tasks take the per-task block sizes of spion.md §4.1: ListOps, Text, Retrieval 64; Image, Pathfinder 32.
  Any other task takes 64 (with a note saying so).
- At the ``tiny`` scale a block that leaves fewer than 4 blocks per sequence (nb = L / B < 4) shrinks to
  ``TINY_BLOCK`` = 16, the smallest block the kernels support; L is the task model config's ``max_len``.

The rule reads the task name and the model config the harness passes (``bench.method.MethodContext``), never the
task registry. Its notes end up in method configs, hence in record config hashes: keep them byte-stable.
"""
from __future__ import annotations

from typing import Any

# spion.md §4.1: block size per LRA task
LRA_BLOCK_SIZES = {"listops": 64, "text": 64, "retrieval": 64, "image": 32, "pathfinder": 32}
DEFAULT_BLOCK = 64
TINY_BLOCK = 16  # smallest block the kernels support; gives nb >= 4 at the tiny presets' lengths (128-256)
MIN_BLOCKS_TINY = 4


def lra_task_key(task_name: str) -> str | None:
    """'lra_listops' / 'lra-text' / 'listops...' -> the LRA task key of spion.md §4.1, else None."""
    name = task_name.lower().removeprefix("lra_").removeprefix("lra-")
    return next((k for k in LRA_BLOCK_SIZES if name.startswith(k)), None)


def model_max_len(model_cfg: Any) -> int | None:
    """The model config's ``max_len`` (the padded length the layouts are built for), or None if it has none.

    Only ``max_len`` counts (not ``MethodContext.max_len``'s fallbacks such as ``max_src_len`` or ``ctx``): the
    rule has always read that field, and a different L would change the notes of committed record configs."""
    try:
        v = int(getattr(model_cfg, "max_len"))
    except (AttributeError, TypeError, ValueError):
        return None
    return v


def block_size_for(task_name: str, scale: str, max_len: int | None) -> tuple[int, str]:
    """The block size for a task at a scale, and a note when it differs from spion.md §4.1 (else "")."""
    key = lra_task_key(task_name)
    block = LRA_BLOCK_SIZES[key] if key else DEFAULT_BLOCK
    if scale != "tiny":
        return block, "" if key else f"{task_name}: not an LRA task of spion.md §4.1; block size {block}"
    L = max_len
    if L is not None and L // block >= MIN_BLOCKS_TINY:
        return block, ""
    return TINY_BLOCK, (f"tiny scale: block_size {block} -> {TINY_BLOCK} so that nb = L / B >= {MIN_BLOCKS_TINY} "
                        f"(L = {L if L is not None else 'unknown'})")


def block_size(ctx) -> tuple[int, str]:
    """``block_size_for`` from a ``bench.method.MethodContext``: its task, scale and model config's ``max_len``."""
    return block_size_for(ctx.task, ctx.scale, model_max_len(ctx.model))

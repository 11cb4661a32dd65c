"""Test-wide setup: Triton's CPU interpreter without a GPU, a private cache, a headless matplotlib.

Tests never read ../shared and never write into results/ or the user's cache.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("SPARSEBENCH_CACHE", tempfile.mkdtemp(prefix="sparsebench-test-cache-"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

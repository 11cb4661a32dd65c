"""Test-wide setup: Triton's CPU interpreter without a GPU, a private cache, a headless matplotlib.

Tests never read ../shared and never write into results/ or the user's cache.
"""
import os
import tempfile

# One intra-op thread: on a 2-core CI box OpenMP's spinning threads collide with autograd and with the
# subprocesses some tests start (a tiny batched matmul backward went from 5 ms to 2 s); set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("SPARSEBENCH_CACHE", tempfile.mkdtemp(prefix="sparsebench-test-cache-"))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

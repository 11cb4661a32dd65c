#!/usr/bin/env python
"""sparsebench entry point: ``python run_all.py --help`` explains everything.

CPU threads: one intra-op thread per core this process may use (``sched_getaffinity``), unless ``OMP_NUM_THREADS``
says otherwise; more threads than cores make every CPU step many times slower when other processes are running.
"""
import os
import sys

from bench.env import usable_cores as _cores  # torch-free: the thread count is set before torch loads

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(_cores()))  # before torch loads (OpenMP reads it once)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else _cores())
    from bench.cli import main

    sys.exit(main())

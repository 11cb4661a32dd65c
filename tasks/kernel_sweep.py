"""Kernel sweep (suite ``kernels``): times the shared block-sparse kernel against the dense kernels.

Not a training task: ``python run_all.py --suite kernels`` runs ``kernels.benchmark.run_sweep`` with the
scale's preset (``small``/``paper`` on a GPU: L in {1k, 4k, 16k, 32k}, D in {64, 128}, bf16, six densities,
random/local/BigBird layouts; ``tiny``: a toy CPU sweep of the torch reference that only tests the
harness) and writes one ``kind="kernel_sweep"`` record whose ``measurements.rows`` hold every point.
Override the grid with ``sweep.<field>=...`` (e.g. ``sweep.lengths=4096,16384``). ``sweep.record_layouts=<record.json>,...``
also times the learned layouts of SPION run records at their own attention shape, next to the sweep's patterns
built at the same density and the dense kernels (``sweep.lengths=`` empty skips the generic grid).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from bench import env as envmod
from bench.config import apply_overrides_to, to_dict
from bench.errors import BenchError
from bench.records import RunRecord
from bench.registry import register_task
from kernels.benchmark import PRESETS, SweepConfig, run_sweep


@register_task("kernel_sweep", suite="kernels")
class KernelSweep:
    KIND = "kernel_sweep"
    REFERENCE: dict = {}

    def __init__(self, scale: str, seed: int, device, progress: bool = False, overrides=()):
        self.scale, self.seed, self.device, self.progress = scale, seed, device, progress
        self.cfg: SweepConfig = apply_overrides_to(PRESETS[scale], [o.split(".", 1)[1] for o in overrides], "sweep")
        for path in self.cfg.record_layouts:  # fail before any timing, in one line
            p = Path(path)
            if not p.is_file():
                raise BenchError(f"sweep.record_layouts: {path} is not a file; pass run records, e.g. "
                                 f"results/lra/<task>__spion_cf__...json")
            if not (json.loads(p.read_text(encoding="utf-8")).get("method_info") or {}).get("layouts"):
                raise BenchError(f"sweep.record_layouts: {path} holds no method_info.layouts (pass a SPION run "
                                 f"that switched to sparse attention)")

    @classmethod
    def data_available(cls, data_dir, scale):
        return None

    def run(self) -> RunRecord:
        import torch
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        cfg = self.cfg
        n = len(cfg.lengths) * len(cfg.head_dims) * (len(cfg.patterns) * len(cfg.densities))
        n = None if cfg.record_layouts else n  # their job count is known only once the records are read
        with tqdm(total=n, desc="kernel sweep", disable=not self.progress) as bar:
            rows = run_sweep(cfg, self.device, progress=bar, log=(lambda s: None) if self.progress else print)
        config = {"task": "kernel_sweep", "scale": self.scale, "seed": self.seed, "sweep": to_dict(cfg)}
        chash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
        return RunRecord(
            kind="kernel_sweep", task="kernel_sweep", method="block_sparse_triton", scale=self.scale, seed=self.seed,
            config=config, config_hash=chash, metrics={}, higher_is_better={},
            measurements={"rows": rows, "timing": "triton.testing.do_bench median" if self.device.type == "cuda"
                          else "perf_counter median of 3 (CPU, toy sizes: not a performance number)"},
            budget={"main_metric": "", "reduced": self.scale != "paper",
                    "note": "" if self.scale == "paper" else f"{self.scale} grid (no L=64k memory point)"},
            method_info={"family": "sparse"}, env=envmod.environment(str(self.device)), git=envmod.git_state(),
            date=envmod.now_utc(), wall_time_s=time.perf_counter() - t0,
        )

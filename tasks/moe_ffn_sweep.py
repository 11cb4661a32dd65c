"""MoE FFN sweep (suite ``kernels``): times the DSTI / D2DMoE expert FFN kernel against the dense FFN.

Not a training task: ``python run_all.py --suite kernels --tasks moe_ffn_sweep`` runs ``kernels.moe_ffn.run_sweep``
with the scale's preset (``small`` on a GPU: MiniLM and BERT-base FFNs, T in {1 .. 32k} tokens, d_e in {24, 48, 96},
executed fractions f in {0.05 .. 1}, bf16, dense cuBLAS vs the Triton kernel ("hidden" and "pairs" combines) vs
``torch._grouped_mm``, eager and CUDA-graph replays; ``tiny``: a toy CPU sweep of the torch backend that only tests
the harness) and writes one ``kind="moe_ffn_sweep"`` record whose ``measurements.rows`` hold every point (the rows of
``run_sweep``: model, d_e, T, fraction, kernel, ms, speedup_vs_dense, graph_ms, ...). It has no ``paper`` scale
(``small`` is the full grid of docs/perf.md). Override the grid with ``sweep.<field>=...`` (e.g.
``sweep.tokens=4096,32768 sweep.fractions=0.05,0.1``; ``sweep.models=bert-base:768:3072``, as the module's CLI
``--models``). In a ``--suite kernels`` run a ``sweep.<field>=`` reaches this task only if its grid has that field
(``SWEEP_CONFIG``, see ``bench.cli.sweep_overrides``); ``moe_ffn_sweep.sweep.<field>=`` names this task alone. The
block-sparse sweep declares no grid and takes every generic one, so ``--suite kernels sweep.tokens=...`` stops in it
with a one-line error: give ``--tasks moe_ffn_sweep``.
The run's seed names a repeat; ``sweep.seed=`` sets the weights', inputs' and selections' draw.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace

from bench import env as envmod
from bench.config import apply_overrides_to, to_dict
from bench.errors import BenchError
from bench.records import RunRecord
from bench.registry import register_task
from kernels.moe_ffn import PRESETS, SWEEP_KERNELS, SweepConfig, grouped_mm_info, run_sweep


def _models(value: str) -> tuple[tuple[str, int, int], ...]:
    """``name:d_model:d_ff,...`` (the CLI's ``--models`` form) -> the config's model triples."""
    out = []
    for item in (p.strip() for p in value.split(",") if p.strip()):
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[1]) < 1 or int(parts[2]) < 1:
            raise BenchError(f"invalid value for sweep.models: {item!r}; expected name:d_model:d_ff, "
                             f"e.g. bert-base:768:3072")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return tuple(out)


@register_task("moe_ffn_sweep", suite="kernels")
class MoEFFNSweep:
    KIND = "moe_ffn_sweep"
    REFERENCE: dict = {}
    SCALES = tuple(PRESETS)  # tiny, small
    SWEEP_CONFIG = SweepConfig  # the fields a generic sweep.<field>= override may set (bench.cli.sweep_overrides)

    def __init__(self, scale: str, seed: int, device, progress: bool = False, overrides=()):
        self.scale, self.seed, self.device, self.progress = scale, seed, device, progress
        fields = [o.split(".", 1)[1] for o in overrides]
        is_models = [f.split("=", 1)[0].strip() == "models" for f in fields]
        cfg = apply_overrides_to(PRESETS[scale], [f for f, m in zip(fields, is_models) if not m], "sweep")
        for f in (f for f, m in zip(fields, is_models) if m):  # name:d_model:d_ff triples: not the generic form
            cfg = replace(cfg, models=_models(f.split("=", 1)[1]))
        self.cfg: SweepConfig = cfg
        bad = [k for k in cfg.kernels if k not in SWEEP_KERNELS]
        if bad:  # fail before any timing, in one line
            raise BenchError(f"sweep.kernels: unknown {', '.join(bad)}; valid: {', '.join(SWEEP_KERNELS)}")
        if not (cfg.tokens and cfg.models and cfg.expert_sizes and cfg.fractions):
            raise BenchError("sweep.tokens, sweep.models, sweep.expert_sizes and sweep.fractions must not be empty")

    @classmethod
    def data_available(cls, data_dir, scale):
        return None

    def _timing(self) -> str:
        cfg = self.cfg
        if self.device.type != "cuda":
            return "perf_counter median of 3 (CPU, toy sizes: not a performance number)"
        graphs = "; dense and moe_triton also replayed from CUDA graphs (graph_ms)" if cfg.graphs else ""
        return (f"triton.testing.do_bench median (warmup {cfg.warmup_ms} ms, rep {cfg.rep_ms} ms); speedup = dense ms / "
                f"kernel ms, same process{graphs}")

    def run(self) -> RunRecord:
        import torch
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        cfg = self.cfg
        cuda = self.device.type == "cuda"
        with tqdm(total=len(cfg.models) * len(cfg.tokens), desc="moe ffn sweep", unit="(model, T)",
                  disable=not self.progress) as bar:
            # run_sweep calls checkpoint(rows) after every (model, T): the bar's unit
            rows = run_sweep(cfg, self.device, log=(lambda s: None) if self.progress else print,
                             checkpoint=lambda _rows: bar.update(1))
        config = {"task": "moe_ffn_sweep", "scale": self.scale, "seed": self.seed, "sweep": to_dict(cfg)}
        chash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
        return RunRecord(
            kind="moe_ffn_sweep", task="moe_ffn_sweep", method="moe_ffn_triton" if cuda else "moe_ffn_torch",
            scale=self.scale, seed=self.seed, config=config, config_hash=chash, metrics={}, higher_is_better={},
            measurements={"rows": rows, "timing": self._timing(), "grouped_mm": grouped_mm_info()},
            budget={"main_metric": "", "reduced": self.scale == "tiny",
                    "note": "" if self.scale != "tiny" else "tiny grid (torch backend at toy sizes, tests the harness)"},
            method_info={"family": "ffn_sparsity"}, env=envmod.environment(str(self.device)), git=envmod.git_state(),
            date=envmod.now_utc(), wall_time_s=time.perf_counter() - t0,
        )

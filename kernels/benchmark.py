"""Declarative perf sweep: block-sparse Triton vs SDPA (cuDNN, flash) and FlexAttention on the same layout.

FLOPs (dense-equivalent, non-causal): fwd = 4·B·H·L²·D, bwd = 2.5× fwd, fwd+bwd = 3.5× fwd.
Effective TFLOP/s of a sparse kernel counts only the kept blocks: density × dense FLOPs / time.
Bytes floor of the block-sparse forward: Q, K, V read once and O written once = 4·B·H·L·D·2 bytes
(bf16), plus K/V re-reads per kept block when they do not stay in L2 — see docs/perf.md.

Every point is checked against FlexAttention (same layout) before it is timed; timings are
``triton.testing.do_bench`` medians, all kernels in one process, layouts and LUTs built outside the
timed region (LUT build time is reported separately).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kernels.block_sparse_attention import block_sparse_attention
from kernels.layout import bigbird_layout, build_lut, layout_density, local_layout, random_layout


@dataclass(frozen=True)
class SweepConfig:
    lengths: tuple[int, ...] = (1024, 4096, 16384, 32768)
    head_dims: tuple[int, ...] = (64, 128)
    densities: tuple[float, ...] = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
    patterns: tuple[str, ...] = ("random", "local", "bigbird")
    tokens_per_batch: int = 16384  # B = max(1, tokens // L): same work per point as the spec's anchors
    hidden: int = 1024  # H = hidden // D
    block_size: int = 128
    dtype: str = "bfloat16"
    kernels: tuple[str, ...] = ("block_sparse_triton", "flex", "sdpa_cudnn", "sdpa_flash")
    backward: bool = True
    extra_lengths: tuple[int, ...] = ()  # memory check only (fwd+bwd of one sparse point), e.g. 65536
    record_layouts: tuple[str, ...] = ()  # SPION run records: time their layouts at their shape (equal density)
    warmup_ms: int = 25
    rep_ms: int = 100


PRESETS = {
    # CPU: exercises the harness with the torch reference and SDPA math at toy sizes (numbers meaningless)
    "tiny": SweepConfig(lengths=(256,), head_dims=(32,), densities=(0.25, 1.0), patterns=("random",),
                        tokens_per_batch=256, hidden=64, block_size=32, dtype="float32",
                        kernels=("block_sparse_torch", "sdpa_math")),
    "small": SweepConfig(),
    "paper": SweepConfig(extra_lengths=(65536,)),
}


def make_layout(pattern: str, nb: int, density: float, n_heads: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if density >= 1.0 or pattern == "dense":
        return torch.ones(1, nb, nb, dtype=torch.bool)
    if pattern == "random":  # per-head random blocks, diagonal kept (as in the spec's Flex anchors)
        return random_layout(n_heads, nb, density, generator=g)
    if pattern == "local":  # window w covers (2w+1) blocks per row
        return local_layout(nb, max(0, round((density * nb - 1) / 2)))
    if pattern == "bigbird":  # 1 global block, window 1, random blocks fill the remaining budget
        per_row = max(density * nb - 3 - 2, 0)
        return bigbird_layout(nb, 1, 1, int(round(per_row)), generator=g)
    raise ValueError(f"pattern {pattern!r}: expected random, local, bigbird or dense")


def _bench(fn, cfg: SweepConfig, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Flex:
    """Compiled FlexAttention with a BlockMask built from our layout (no mask_mod: full blocks)."""

    def __init__(self, cuda: bool):
        from torch.nn.attention.flex_attention import flex_attention

        self.fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention

    @staticmethod
    def block_mask(layout: torch.Tensor, B: int, H: int, L: int, bs: int, device):
        from torch.nn.attention.flex_attention import BlockMask

        lay = layout.to(device).expand(H, -1, -1)  # (H, nb, nb)
        counts = lay.sum(-1).to(torch.int32)  # (H, nb)
        order = torch.argsort((~lay).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # kept first
        counts, order = counts[None].expand(B, -1, -1).contiguous(), order[None].expand(B, -1, -1, -1).contiguous()
        zeros = torch.zeros_like(counts)
        return BlockMask.from_kv_blocks(zeros, order, counts, order, BLOCK_SIZE=bs, seq_lengths=(L, L))


def _dense_fn(kind: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
               "sdpa_math": SDPBackend.MATH}[kind]

    def f(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return f


def run_sweep(cfg: SweepConfig, device: torch.device, progress=None, log=print) -> list[dict]:
    cuda = device.type == "cuda"
    if cuda:  # past the recompile limit torch.compile silently runs Flex eagerly: never let it get there
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.accumulated_recompile_limit = 4096
    rows: list[dict] = []
    for L in cfg.lengths:
        for D in cfg.head_dims:
            H, B = max(1, cfg.hidden // D), max(1, cfg.tokens_per_batch // L)
            nb = math.ceil(L / cfg.block_size)
            jobs = [("dense" if d >= 1.0 else pattern, d, make_layout(pattern, nb, d, H, seed=L + D))
                    for pattern in cfg.patterns for d in cfg.densities
                    if d < 1.0 or pattern == cfg.patterns[0]]  # one full-density point is enough
            rows += time_layouts(B, H, L, D, cfg.block_size, jobs, cfg, device, progress, log)
    for rec_path in cfg.record_layouts:
        rows += time_record_layouts(rec_path, cfg, device, progress, log)
    for L in cfg.extra_lengths:  # O(L·D) memory: a long sequence must run at all
        rows.append(_memory_point(L, cfg, device, getattr(torch, cfg.dtype)))
    return rows


def time_layouts(B: int, H: int, L: int, D: int, block: int, jobs: list[tuple[str, float, torch.Tensor]],
                 cfg: SweepConfig, device: torch.device, progress=None, log=print, extra: dict | None = None) -> list[dict]:
    """Dense SDPA kernels once, then every (pattern label, target density, layout) job with every sparse kernel
    of ``cfg.kernels``, all on the same (B, H, L, D) inputs; each sparse result is checked before it is timed."""
    cuda = device.type == "cuda"
    dtype = getattr(torch, cfg.dtype)
    if cuda:
        torch._dynamo.reset()  # fresh compile cache per shape
    flex = _Flex(cuda) if "flex" in cfg.kernels else None
    gen = torch.Generator(device="cpu").manual_seed(L * 1000 + D)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_(cfg.backward) for _ in range(3))
    dout = torch.randn(B, H, L, D, generator=gen).to(device, dtype)  # (B, H, L, D)
    dense_flops = 4.0 * B * H * L * L * D
    base = dict(L=L, D=D, B=B, H=H, dtype=cfg.dtype, block_size=block, **(extra or {}))
    rows = [{**base, **_time_point(kind, _dense_fn(kind), q, k, v, dout, cfg, cuda, dense_flops, 1.0, "dense")}
            for kind in cfg.kernels if kind.startswith("sdpa")]
    for p, density, layout in jobs:
        t0 = time.perf_counter()
        build_lut(layout, False, device)
        if cuda:
            torch.cuda.synchronize()
        point = {**base, "pattern": p, "density_target": density, "lut_build_ms": (time.perf_counter() - t0) * 1e3}
        real = layout_density(layout)
        ref_out, mine = None, []
        for kind in cfg.kernels:
            if kind.startswith("sdpa"):
                continue
            if kind == "flex":
                bm = _Flex.block_mask(layout, B, H, L, block, device)
                fn = lambda q, k, v, bm=bm: flex.fn(q, k, v, block_mask=bm)  # noqa: E731
            else:
                backend = "triton" if kind == "block_sparse_triton" else "torch"
                lay_dev = layout.to(device)
                fn = lambda q, k, v, lay=lay_dev, be=backend: block_sparse_attention(  # noqa: E731
                    q, k, v, lay, block_size=block, backend=be)
            with torch.no_grad():
                out = fn(q, k, v).float()
            err = None
            if ref_out is None:
                ref_out = out
            else:  # correctness before timing: same layout, same inputs
                err = ((out - ref_out).norm() / ref_out.norm()).item()
                if not err < 2e-2:
                    raise RuntimeError(f"{kind} disagrees with the first sparse kernel at L={L} D={D} "
                                       f"{p} density={density}: rel err {err:.3g}")
            mine.append({**point, **_time_point(kind, fn, q, k, v, dout, cfg, cuda, dense_flops, real, p),
                         "check_rel_err": err})
        rows += mine
        if progress is not None:
            progress.update(1)
        log(f"L={L} D={D} {p} density={real:.3f}: " + ", ".join(
            f"{r['kernel']} {r['fwd_ms']:.3f}/{r.get('fwdbwd_ms') or float('nan'):.3f} ms" for r in mine))
    del q, k, v, dout
    if cuda:
        torch.cuda.empty_cache()
    return rows


def time_record_layouts(path: str, cfg: SweepConfig, device: torch.device, progress=None, log=print) -> list[dict]:
    """SPION's learned layouts from a run record, at that run's attention shape (batch, heads, L, head dim,
    block), next to every ``cfg.patterns`` layout built at the same density and the dense kernels: the
    equal-density, attention-only comparison that a training step's time cannot give."""
    import json
    from pathlib import Path

    rec = json.loads(Path(path).read_text(encoding="utf-8"))
    info, model = rec.get("method_info", {}), rec.get("config", {}).get("model", {})
    layouts = info.get("layouts")
    if not layouts:
        raise ValueError(f"{path}: the record holds no method_info.layouts (a SPION run that switched to sparse)")
    nb, block = len(layouts[0]), int(info["block_size"])
    H = int(model["n_heads"])
    D = int(model.get("d_qkv") or model["d_model"]) // H
    B, L = int(rec["config"]["train"]["batch_size"]), nb * block
    jobs = []
    for i, lay in enumerate(layouts):
        lay = torch.tensor(lay, dtype=torch.bool)[None]  # (1, nb, nb): one layout per layer, shared by heads
        d = layout_density(lay)
        jobs.append((f"spion_layer{i}", d, lay))
        jobs += [(f"{p}@spion_layer{i}", d, make_layout(p, nb, d, H, seed=nb + i)) for p in cfg.patterns if p != "dense"]
    src = {"source_record": f"{rec['task']}/{rec['method']}/s{rec['seed']}/{rec['config_hash']}"}
    return time_layouts(B, H, L, D, block, jobs, cfg, device, progress, log, extra=src)


def time_kernel(fn, q, k, v, dout, cfg: SweepConfig, cuda: bool, backward: bool) -> tuple[float, float | None]:
    """(fwd ms, fwd+bwd ms or None): the one timing protocol of the sweep, its records and the GPU regression
    tests, so that a test compares like with like (grads are cleared, not accumulated, between calls)."""
    fwd = _bench(lambda: fn(q, k, v), cfg, cuda)
    if not backward:
        return fwd, None

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    return fwd, _bench(step, cfg, cuda)


def _time_point(kind, fn, q, k, v, dout, cfg, cuda, dense_flops, density, pattern) -> dict:
    fwd, fb = time_kernel(fn, q, k, v, dout, cfg, cuda, cfg.backward)
    row = {"kernel": kind, "pattern": pattern, "density": density, "fwd_ms": fwd,
           "fwd_tflops_eff": density * dense_flops / (fwd * 1e-3) / 1e12}
    if fb is not None:
        row.update(fwdbwd_ms=fb, fwdbwd_tflops_eff=3.5 * density * dense_flops / (fb * 1e-3) / 1e12)
    return row


def _memory_point(L: int, cfg: SweepConfig, device, dtype) -> dict:
    D, density = cfg.head_dims[0], 0.05
    H, nb = max(1, cfg.hidden // D), math.ceil(L / cfg.block_size)
    q, k, v = (torch.randn(1, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    layout = make_layout("random", nb, density, H, seed=L).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = block_sparse_attention(q, k, v, layout, block_size=cfg.block_size)
    out.backward(torch.ones_like(out))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    io = 4 * q.numel() * q.element_size() / 2**20  # O and dQ/dK/dV: what O(L·D) allows
    return {"kernel": "block_sparse_triton", "pattern": "random", "L": L, "D": D, "B": 1, "H": H,
            "density": layout_density(layout), "dtype": cfg.dtype, "memory_check": True,
            "peak_extra_mib": peak, "io_tensors_mib": io, "fwd_ms": None}


def sweep_config_dict(cfg: SweepConfig) -> dict:
    return asdict(cfg)

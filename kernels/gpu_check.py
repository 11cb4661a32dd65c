"""GPU check for the block-sparse attention kernels: correctness, tile sweep, timings.

    python -m kernels.gpu_check [--parts correctness,tune,bench,big] [--out DIR]

* correctness: triton vs an fp64 reference on CUDA (fp32 / bf16, D 64 / 128, L up to 16k, renorm
  and phantom_zero, causal, key padding, odd L; rectangular Lq != Lk, causal rectangular (bottom-right
  diagonal), per-head element masks with fully pruned rows and ``empty_rows="uniform"``; forward and
  dq/dk/dv) with the suite's tolerance
  rule (docs/perf.md): err(triton) <= 2x (out) / 3x (grads) err(same-precision dense PyTorch).
  Also attention_stats vs its torch reference.
* tune: a small sweep of (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim.
* bench: bf16 timings vs SDPA (cuDNN, flash) dense and compiled FlexAttention on the same layout.
* big: L = 65536 forward + backward, peak memory.

Logs go to $OUT (or --out); the last thing printed is a short table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback

import torch

from kernels import block_sparse_attention, attention_stats, pack_element_mask, random_layout
from kernels.block_sparse_attention import (
    _triton_backward, _triton_forward, block_sparse_attention_reference,
)
from kernels.layout import get_lut

LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def dense_same_precision(q, k, v, layout, bs, causal, kpm, mode, em=None, empty_rows="zero"):
    """Plain dense masked attention in q's dtype (the 'same-precision PyTorch' of the tolerance rule).
    q (B, H, Lq, D), k/v (B, H, Lk, D); causal bottom-right aligned; ``em`` bool (H|1, Lq, Lk) keep-mask;
    ``empty_rows="uniform"``: AP's finite fill (pruned -> dtype min / 2, invalid -> -inf)."""
    B, H, L, D = q.shape
    LK = k.shape[2]
    lay = layout.to(q.device).repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :L, :LK]
    vis = torch.ones(L, LK, dtype=torch.bool, device=q.device)
    if causal:
        vis = vis.tril(diagonal=LK - L)
    kept = lay[None] if em is None else lay[None] & em.to(q.device)[None]
    valid = vis[None, None] if kpm is None else vis[None, None] & kpm[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    if mode == "renorm" and empty_rows == "uniform":
        s = s.masked_fill(~kept, torch.finfo(s.dtype).min / 2).masked_fill(~valid, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
    elif mode == "renorm":
        s = s.masked_fill(~(kept & valid), float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
    else:
        s = torch.where(kept, s, torch.zeros_like(s)).masked_fill(kept & ~valid, float("-inf"))
        p = torch.softmax(s, -1) * (kept & valid)
    return p.to(q.dtype) @ v


def _element_mask(g, hm, L, LK, dev):
    """A random AP-like keep-mask (60 % kept) with fully pruned rows and a fully pruned block."""
    em = torch.rand(hm, L, LK, generator=g) < 0.6
    em[:, L // 3] = False
    em[:, L // 2: L // 2 + 7] = False
    em[:, :64, :64] = False
    return em.to(dev)


def correctness():
    rows = []
    dev = "cuda"
    cases = [
        # B, H, L, D, bs, dtype, causal, kpm, mode, per_head_layout[, extras]
        (2, 2, 1024, 64, 64, torch.bfloat16, False, False, "renorm", True),
        (2, 2, 1000, 128, 64, torch.bfloat16, True, True, "renorm", False),
        (1, 2, 2048, 64, 128, torch.bfloat16, False, True, "phantom_zero", False),
        (2, 2, 1024, 128, 32, torch.float32, False, True, "phantom_zero", True),
        (2, 2, 777, 64, 64, torch.float32, True, False, "renorm", True),
        (1, 2, 4096, 128, 128, torch.bfloat16, True, False, "renorm", True),
        (1, 2, 16384, 64, 128, torch.bfloat16, False, True, "renorm", False),
        (1, 1, 16384, 128, 64, torch.bfloat16, False, False, "phantom_zero", False),
        (2, 2, 512, 16, 16, torch.float16, True, True, "renorm", True),
        (2, 2, 500, 32, 32, torch.float16, False, True, "phantom_zero", True),
        # Attention Pruning features: rectangular (cross-attention), causal rectangular (bottom-right
        # diagonal), per-head element masks with fully pruned rows, the uniform fallback
        (2, 2, 700, 64, 64, torch.bfloat16, False, True, "renorm", True, dict(lk=1500)),
        (2, 2, 1500, 128, 64, torch.float32, False, True, "renorm", False, dict(lk=777)),
        (2, 2, 1000, 64, 128, torch.bfloat16, True, True, "renorm", True, dict(lk=2048)),
        (2, 2, 2048, 64, 64, torch.float16, True, False, "renorm", True, dict(lk=1000)),
        (2, 4, 1024, 64, 64, torch.bfloat16, False, True, "renorm", True, dict(em="per_head")),
        (2, 2, 999, 128, 64, torch.float32, True, True, "renorm", True, dict(em="per_head", empty_rows="uniform")),
        (2, 2, 600, 64, 32, torch.bfloat16, True, True, "renorm", False,
         dict(lk=1300, em="broadcast", empty_rows="uniform")),
        (1, 2, 4096, 64, 128, torch.bfloat16, True, False, "renorm", True, dict(em="per_head")),
    ]
    for case in cases:
        (B, H, L, D, bs, dt, causal, use_kpm, mode, ph), extra = case[:10], (case[10] if len(case) > 10 else {})
        LK = extra.get("lk", L)
        em_kind, empty_rows = extra.get("em"), extra.get("empty_rows", "zero")
        name = (f"B{B} H{H} L{L}" + (f"x{LK}" if LK != L else "") + f" D{D} bs{bs} {str(dt)[6:]} causal={int(causal)} "
                f"kpm={int(use_kpm)} {mode}" + (f" em={em_kind}" if em_kind else "")
                + (f" empty_rows={empty_rows}" if empty_rows != "zero" else ""))
        try:
            g = torch.Generator().manual_seed(L + D + LK)
            nbq, nbk = math.ceil(L / bs), math.ceil(LK / bs)
            if LK == L:
                lay = random_layout(H if ph else 1, nbq, 0.3, g, keep_diagonal=True)
            else:
                lay = torch.rand(H if ph else 1, nbq, nbk, generator=g) < 0.3
            lay[:, 1] = False  # an empty query-block row
            lay[:, :, min(2, nbk - 1)] = False  # an empty key-block column
            q = torch.randn(B, H, L, D, device=dev, dtype=torch.float64)
            k, v = [torch.randn(B, H, LK, D, device=dev, dtype=torch.float64) for _ in range(2)]
            kpm = None
            if use_kpm:
                kpm = torch.ones(B, LK, dtype=torch.bool, device=dev)
                kpm[0, LK * 3 // 4:] = False
                kpm[-1, : LK // 10] = False
            em = None if em_kind is None else _element_mask(g, H if em_kind == "per_head" else 1, L, LK, dev)
            do = torch.randn(B, H, L, D, device=dev, dtype=torch.float64)
            kw = dict(block_size=bs, causal=causal, key_padding_mask=kpm, softmax_mode=mode, element_mask=em,
                      empty_rows=empty_rows)
            # fp64 reference (chunked, checkpointed) with autograd
            qr, kr, vr = [x.clone().requires_grad_() for x in (q, k, v)]
            ref = block_sparse_attention_reference(qr, kr, vr, lay, **kw)
            rg = torch.autograd.grad(ref, (qr, kr, vr), do)
            # same-precision dense pytorch
            if L * LK <= 4096 * 4096:
                qs, ks, vs = [x.to(dt).requires_grad_() for x in (q, k, v)]
                sp = dense_same_precision(qs, ks, vs, lay, bs, causal, kpm, mode, em, empty_rows)
                sg = torch.autograd.grad(sp, (qs, ks, vs), do.to(dt))
                sp_err = [(sp.double() - ref).abs().max().item()] + [(a.double() - b).abs().max().item() for a, b in zip(sg, rg)]
                del sp, sg
            else:
                sp_err = None
            qt, kt, vt = [x.to(dt).requires_grad_() for x in (q, k, v)]
            if em is not None:
                kw["element_mask"] = pack_element_mask(em)  # the hot-path form (a bool mask is packed per call)
            out = block_sparse_attention(qt, kt, vt, lay, backend="triton", **kw)
            tg = torch.autograd.grad(out, (qt, kt, vt), do.to(dt))
            tr_err = [(out.double() - ref).abs().max().item()] + [(a.double() - b).abs().max().item() for a, b in zip(tg, rg)]
            nan = any(torch.isnan(x).any().item() for x in (out, *tg))
            if sp_err is not None:
                ratio = [t / max(s, 1e-6 * 1) for t, s in zip(tr_err, sp_err)]
                ok = (not nan) and ratio[0] <= 2 and all(r <= 3 for r in ratio[1:])
            else:
                # no dense same-precision run at 16k (memory): compare to a bound from the dtype eps
                eps = torch.finfo(dt).eps
                ratio = [t / (eps * 16) for t in tr_err]
                ok = (not nan) and all(r <= 3 for r in ratio)
            log(f"[corr] {name}: triton err {['%.2e' % e for e in tr_err]} same-prec err "
                f"{['%.2e' % e for e in sp_err] if sp_err else '-'} ratio {['%.2f' % r for r in ratio]} nan={nan} "
                f"{'OK' if ok else 'FAIL'}")
            rows.append((name, ok, max(ratio)))
        except Exception as e:  # keep going, report
            log(f"[corr] {name}: EXCEPTION {e!r}")
            log(traceback.format_exc())
            rows.append((name, False, float("nan")))
        torch.cuda.empty_cache()
    # attention stats
    for (B, H, L, D, bs, causal, ph) in [(4, 2, 1024, 64, 64, False, False), (3, 2, 1000, 32, 32, True, True),
                                          (2, 2, 700, 64, None, False, True)]:
        name = f"stats B{B} H{H} L{L} D{D} bs{bs} causal={int(causal)} per_head={int(ph)}"
        try:
            q, k = [torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(2)]
            kpm = torch.ones(B, L, dtype=torch.bool, device=dev)
            kpm[0, L // 2:] = False
            a = attention_stats(q, k, key_padding_mask=kpm, causal=causal, block_size=bs, per_head=ph, backend="triton")
            r = attention_stats(q.double(), k.double(), key_padding_mask=kpm, causal=causal, block_size=bs,
                                per_head=ph, backend="torch")
            err = (a.double() - r.double()).abs().max().item()
            ok = err < 1e-3 * max(1.0, r.abs().max().item())
            log(f"[corr] {name}: err {err:.2e} {'OK' if ok else 'FAIL'}")
            rows.append((name, ok, err))
        except Exception as e:
            log(f"[corr] {name}: EXCEPTION {e!r}")
            log(traceback.format_exc())
            rows.append((name, False, float("nan")))
    return rows


def _bench(fn, grad_to_none=None):
    import triton.testing
    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def _make(B, H, L, D, density, bs=128, dt=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(L / bs)
    lay = random_layout(H, nb, density, g, keep_diagonal=True)
    q, k, v = [torch.randn(B, H, L, D, device="cuda", dtype=dt) for _ in range(3)]
    return q, k, v, lay


def tune():
    res = {}
    cands = {
        ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3)],
        ("fwd", 128): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 128, 4, 2)],
        ("dq", 64): [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3)],
        ("dq", 128): [(64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
        ("dkv", 64): [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (32, 128, 8, 3)],
        ("dkv", 128): [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2), (32, 64, 4, 2)],
    }
    shapes = {64: (1, 16, 16384), 128: (1, 8, 16384)}
    for D in (64, 128):
        B, H, L = shapes[D]
        q, k, v, lay = _make(B, H, L, D, 0.255)
        lut = get_lut(lay, False, q.device)
        sm = D ** -0.5
        out, lse = _triton_forward(q, k, v, lut, None, False, False, sm, 128)
        do = torch.randn_like(q)
        for kind in ("fwd", "dq", "dkv"):
            best = None
            for cfg in cands[(kind, D)]:
                try:
                    if kind == "fwd":
                        fn = lambda: _triton_forward(q, k, v, lut, None, False, False, sm, 128, cfg=cfg)  # noqa: E731
                    elif kind == "dq":
                        fn = lambda: _triton_backward(do, q, k, v, out, lse, lut, None, False, sm, 128, cfg_dq=cfg)  # noqa: E731
                    else:
                        fn = lambda: _triton_backward(do, q, k, v, out, lse, lut, None, False, sm, 128, cfg_dkv=cfg)  # noqa: E731
                    t = _bench(fn)
                    log(f"[tune] {kind} D{D} cfg={cfg}: {t:.3f} ms")
                    if best is None or t < best[1]:
                        best = (cfg, t)
                except Exception as e:
                    log(f"[tune] {kind} D{D} cfg={cfg}: EXCEPTION {str(e)[:200]}")
            res[f"{kind}_D{D}"] = best
            log(f"[tune] best {kind} D{D}: {best}")
    return res


def _flex_setup(lay, B, H, L, bs):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    nb = lay.shape[-1]
    layc = lay.to("cuda").expand(H, nb, nb)
    counts = layc.sum(-1).to(torch.int32)[None]  # (1, H, nb)
    idx = torch.argsort((~layc).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]  # kept blocks first
    zeros = torch.zeros_like(counts)
    bm_full = BlockMask.from_kv_blocks(zeros, idx, counts, idx, BLOCK_SIZE=bs, seq_lengths=(L, L))

    def mask_mod(b, h, q_idx, kv_idx):
        return layc[h, q_idx // bs, kv_idx // bs]

    bm_mod = BlockMask.from_kv_blocks(counts, idx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(L, L))
    flex = torch.compile(flex_attention, dynamic=False)
    return flex, bm_full, bm_mod


def bench(flex_mod=True):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    configs = [
        # B, H, L, D, density
        (1, 16, 16384, 64, 0.106), (1, 16, 16384, 64, 0.255), (1, 16, 16384, 64, 0.503),
        (1, 8, 16384, 128, 0.106), (1, 8, 16384, 128, 0.255), (1, 8, 16384, 128, 0.503),
        (4, 16, 4096, 64, 0.273), (4, 16, 4096, 64, 0.128), (4, 16, 4096, 128, 0.273),
    ]
    dense_done = set()
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    for (B, H, L, D, dens) in configs:
        torch._dynamo.reset()  # fresh compile per layout: never hit the recompile limit (eager fallback)
        q, k, v, lay = _make(B, H, L, D, dens)
        real_d = lay.float().mean().item()
        do = torch.randn_like(q)
        qg, kg, vg = [x.clone().requires_grad_() for x in (q, k, v)]
        flops_fwd = 4 * B * H * L * L * D * real_d
        r = {"B": B, "H": H, "L": L, "D": D, "density": round(real_d, 3)}
        # ours
        f = lambda: block_sparse_attention(q, k, v, lay, block_size=128, backend="triton")  # noqa: E731
        r["ours_fwd"] = _bench(f)
        lut = get_lut(lay, False, q.device)
        r["ours_fwd_raw"] = _bench(lambda: _triton_forward(q, k, v, lut, None, False, False, D ** -0.5, 128))

        def fb():
            o = block_sparse_attention(qg, kg, vg, lay, block_size=128, backend="triton")
            o.backward(do)
        r["ours_fwdbwd"] = _bench(fb, grad_to_none=[qg, kg, vg])
        # flex
        try:
            flex, bm_full, bm_mod = _flex_setup(lay, B, H, L, 128)
            r["flex_fwd"] = _bench(lambda: flex(q, k, v, block_mask=bm_full))

            def ffb():
                o = flex(qg, kg, vg, block_mask=bm_full)
                o.backward(do)
            r["flex_fwdbwd"] = _bench(ffb, grad_to_none=[qg, kg, vg])
            if flex_mod and dens in (0.255, 0.273):
                r["flexmod_fwd"] = _bench(lambda: flex(q, k, v, block_mask=bm_mod))

                def ffbm():
                    o = flex(qg, kg, vg, block_mask=bm_mod)
                    o.backward(do)
                r["flexmod_fwdbwd"] = _bench(ffbm, grad_to_none=[qg, kg, vg])
        except Exception as e:
            log(f"[bench] flex failed: {e!r}")
        key = (B, H, L, D)
        if key not in dense_done:
            dense_done.add(key)
            for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel(be):
                        r[f"{name}_fwd"] = _bench(lambda: F.scaled_dot_product_attention(q, k, v))

                        def sfb():
                            o = F.scaled_dot_product_attention(qg, kg, vg)
                            o.backward(do)
                        r[f"{name}_fwdbwd"] = _bench(sfb, grad_to_none=[qg, kg, vg])
                except Exception as e:
                    log(f"[bench] sdpa {name} failed: {e!r}")
        r["ours_tflops_fwd"] = flops_fwd / r["ours_fwd"] / 1e9
        r["ours_tflops_fwdbwd"] = 3.5 * flops_fwd / r["ours_fwdbwd"] / 1e9
        log("[bench] " + json.dumps({k2: (round(v2, 4) if isinstance(v2, float) else v2) for k2, v2 in r.items()}))
        rows.append(r)
        torch.cuda.empty_cache()
    return rows


def big():
    rows = []
    for (L, D, dt, mode) in [(65536, 64, torch.bfloat16, "renorm"), (65536, 128, torch.bfloat16, "phantom_zero")]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        q, k, v, lay = _make(1, 2, L, D, 0.05, bs=64, dt=dt)
        qg, kg, vg = [x.clone().requires_grad_() for x in (q, k, v)]
        base = torch.cuda.memory_allocated()
        t0 = time.time()
        o = block_sparse_attention(qg, kg, vg, lay, block_size=64, softmax_mode=mode, backend="triton")
        o.backward(torch.ones_like(o))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        inputs = 3 * q.numel() * q.element_size()
        ok = not (torch.isnan(o).any() or torch.isnan(qg.grad).any())
        log(f"[big] L={L} D={D} {mode}: peak extra {peak / 2**20:.1f} MiB (q,k,v = {inputs / 2**20:.1f} MiB), "
            f"{time.time() - t0:.2f}s incl. compile, nan-free={ok}")
        rows.append((L, D, mode, peak / 2**20, ok))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="correctness,tune,bench,big")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-flexmod", action="store_true")
    a = ap.parse_args()
    parts = a.parts.split(",")
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}")
    import triton
    log(f"triton {triton.__version__}")
    t0 = time.time()
    res = {}
    if "correctness" in parts:
        res["correctness"] = correctness()
        log(f"[time] correctness {time.time() - t0:.0f}s")
    if "tune" in parts:
        res["tune"] = tune()
        log(f"[time] tune {time.time() - t0:.0f}s")
    if "big" in parts:
        res["big"] = big()
        log(f"[time] big {time.time() - t0:.0f}s")
    if "bench" in parts:
        res["bench"] = bench(flex_mod=not a.no_flexmod)
        log(f"[time] bench {time.time() - t0:.0f}s")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_check.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    # short table last
    print("\n==== summary ====")
    if "correctness" in res:
        n_ok = sum(1 for r in res["correctness"] if r[1])
        print(f"correctness: {n_ok}/{len(res['correctness'])} OK" +
              "".join(f"\n  FAIL {r[0]}" for r in res["correctness"] if not r[1]))
    if "tune" in res:
        for k2, v2 in res["tune"].items():
            print(f"tune {k2}: {v2}")
    if "big" in res:
        for r in res["big"]:
            print(f"big L={r[0]} D={r[1]} {r[2]}: peak extra {r[3]:.0f} MiB ok={r[4]}")
    if "bench" in res:
        print(f"{'B':>2} {'H':>3} {'L':>6} {'D':>4} {'dens':>6} | {'ours f':>7} {'raw f':>7} {'flex f':>7} {'fxmod f':>7} {'cudnn f':>7} | "
              f"{'ours fb':>7} {'flex fb':>7} {'fxmod fb':>8} {'cudnn fb':>8} | {'TF f':>5} {'TF fb':>5}")
        for r in res["bench"]:
            g = lambda k3: r.get(k3, float("nan"))  # noqa: E731
            print(f"{r['B']:>2} {r['H']:>3} {r['L']:>6} {r['D']:>4} {r['density']:>6.3f} | {g('ours_fwd'):7.3f} {g('ours_fwd_raw'):7.3f} "
                  f"{g('flex_fwd'):7.3f} {g('flexmod_fwd'):7.3f} {g('cudnn_fwd'):7.3f} | {g('ours_fwdbwd'):7.3f} "
                  f"{g('flex_fwdbwd'):7.3f} {g('flexmod_fwdbwd'):8.3f} {g('cudnn_fwdbwd'):8.3f} | "
                  f"{g('ours_tflops_fwd'):5.0f} {g('ours_tflops_fwdbwd'):5.0f}")


if __name__ == "__main__":
    main()

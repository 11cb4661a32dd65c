"""Is a kernel change codegen-neutral? Compile the block-sparse kernels for an H100 (sm_90) on a CPU-only box,
at the working tree and at a git revision, and compare their Triton GPU IR.

    python scripts/kernel_ir_diff.py [--rev HEAD~1] [--file kernels/block_sparse_attention.py]

For each kernel and two specialisations (tile-multiple L without masks, which the GPU benchmarks time; and
causal + key padding + ragged L) it prints ``identical`` (same IR up to value names), ``reordered`` (the same
operations, a few in another order) or ``differs`` with the count of changed lines. Needs only the Triton wheel
(its sm_90 compiler runs without a GPU); no timing, so it cannot replace a GPU run for a real code change, but it
tells a refactor from a change in what the GPU executes (docs/perf.md, v6).
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU's triton 3.6 fuses by default; say so explicitly

KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
POINTERS_BF16 = {"Q", "K", "V", "Out", "O", "DO", "DQ", "DK", "DV", "KPM"}
POINTERS_I32 = {"row_ptr", "col_idx", "col_ptr", "row_idx"}
POINTERS_F32 = {"Lse", "Delta"}
CONSTS = dict(BS=128, BLOCK_M=128, BLOCK_N=64, HEAD_DIM=64, CAUSAL=False, HAS_KPM=False, PHANTOM=False,
              EVEN_L=True, DOT_PREC="tf32", UPCAST=False)
VARIANTS = {"plain": {}, "masked": {"CAUSAL": True, "HAS_KPM": True, "EVEN_L": False}}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_ttgir(fn, variant: dict) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const = {}, {}
    for n in fn.arg_names:
        if n in CONSTS:
            sig[n], const[n] = "constexpr", variant.get(n, CONSTS[n])
        else:
            sig[n] = ("*bf16" if n in POINTERS_BF16 else "*i32" if n in POINTERS_I32 else "*fp32" if n in POINTERS_F32
                      else "fp32" if n.startswith("sm_scale") else "i32")
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ttgir"]


def canonical(ttgir: str) -> list[str]:
    """IR lines with locations dropped, layout aliases inlined, constants named by value, values renumbered."""
    lines = [ln.split(" loc(")[0] for ln in ttgir.splitlines() if not ln.startswith("#loc")]
    text = "\n".join(lines)
    aliases = dict(re.findall(r"^(#\w+) = (.*)$", text, re.M))
    for a in sorted(aliases, key=len, reverse=True):
        text = re.sub(re.escape(a) + r"(?!\w)", "<" + aliases[a] + ">", text)
    names: dict[str, str] = {}
    body = []
    for ln in text.splitlines():
        if ln.startswith("<"):
            continue
        m = re.match(r"\s*(%[\w\-]+) = (arith\.constant .*)", ln)
        if m:
            names[m.group(1)] = f"%C<{m.group(2)}>"
            continue
        body.append(ln)

    def rename(m):
        return names.setdefault(m.group(0), f"%v{len(names)}")

    return [re.sub(r"%[A-Za-z_][\w\-]*|%\d+", rename, ln) for ln in body]


def verdict(a: list[str], b: list[str]) -> str:
    if a == b:
        return "identical"
    strip = lambda xs: sorted(re.sub(r"%v\d+", "%", x) for x in xs)  # noqa: E731
    if strip(a) == strip(b):
        return "reordered (same operations)"
    changed = sum(1 for d in difflib.unified_diff(a, b, lineterm="", n=0) if d[:1] in "+-" and d[:3] not in "+++---")
    return f"differs ({changed} lines)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="git revision to compare the working tree with (default HEAD)")
    ap.add_argument("--file", default="kernels/block_sparse_attention.py")
    a = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    try:
        old_src = subprocess.run(["git", "show", f"{a.rev}:{a.file}"], cwd=root, check=True, capture_output=True,
                                 text=True).stdout
    except subprocess.CalledProcessError as e:
        print(f"error: git show {a.rev}:{a.file}: {e.stderr.strip()}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "old_kernels.py"
        # the old module imports its siblings relatively: load it as a module of the kernels package
        old_path.write_text(old_src)
        old = _load(old_path, "kernels._ir_diff_old")
        new = _load(root / a.file, "kernels._ir_diff_new")
        worst = 0
        for k in KERNELS:
            for vname, v in VARIANTS.items():
                res = verdict(canonical(compile_ttgir(getattr(old, k), v)), canonical(compile_ttgir(getattr(new, k), v)))
                worst = max(worst, 0 if res == "identical" else 1 if res.startswith("reordered") else 2)
                print(f"{k:18s} {vname:7s} {res}")
    return 1 if worst == 2 else 0


if __name__ == "__main__":
    raise SystemExit(main())

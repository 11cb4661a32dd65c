"""Write ``baselines/<machine>.json`` (format cpu-ratio-v1) from several runs of the CPU benchmarks.

    python tests/benchmarks/make_cpu_baseline.py [--runs 5]

Each run is a fresh ``python -m pytest tests/benchmarks/test_cpu_paths.py`` with ``SPARSEBENCH_GATE=record``
(measure, do not compare) and ``--benchmark-json``; the committed ratio of each benchmark is the median of its
per-run ratios (each itself a median over rounds, see cpu_gate.py). Run it on an otherwise quiet machine if you
can; the ratios tolerate load, but a quiet baseline is the cleaner reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_gate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="default: baselines/<machine>.json")
    args = ap.parse_args()
    per_bench: dict[str, list[dict]] = {}
    env = {**os.environ, "SPARSEBENCH_GATE": "record"}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            js = Path(tmp) / f"run{i}.json"
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly",
                                "tests/benchmarks/test_cpu_paths.py", f"--benchmark-json={js}"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"run {i} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            for b in json.loads(js.read_text())["benchmarks"]:
                per_bench.setdefault(b["name"], []).append(b["extra_info"])
            print(f"run {i + 1}/{args.runs}: " + ", ".join(
                f"{n} {v[-1]['cpu_ratio']:.3f}" for n, v in sorted(per_bench.items())), flush=True)
    entries = {}
    for name, runs in per_bench.items():
        cals = {r["calibration"] for r in runs}
        assert len(cals) == 1, (name, cals)
        ratios = [r["cpu_ratio"] for r in runs]
        entries[name] = {
            "calibration": cals.pop(),
            "ratio": statistics.median(ratios),
            "ratio_runs": [round(x, 4) for x in ratios],
            "cpu_ms": statistics.median(r["cpu_median_ms"] for r in runs),  # informational, not compared
            "calibration_cpu_ms": statistics.median(r["calibration_cpu_median_ms"] for r in runs),
        }
    out = args.out or cpu_gate.baseline_path()
    out.write_text(json.dumps(cpu_gate.baseline_document(entries, runs=args.runs), indent=1) + "\n")
    print(f"{out}: {len(entries)} benchmarks, medians of {args.runs} runs")


if __name__ == "__main__":
    main()

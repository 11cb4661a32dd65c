"""Write ``baselines/gpu-<gpu>.json`` from the committed kernel-sweep records (no new measurement).

    python tests/benchmarks/make_gpu_baseline.py [results/kernels]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gpu_kernels import HERE, POINTS, gpu_key, point_name  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/kernels")
per_gpu: dict[str, dict] = {}
for f in sorted(root.glob("*.json")):
    rec = json.loads(f.read_text())
    gpu = rec["env"].get("gpu")
    if not gpu:
        continue
    for row in rec["measurements"]["rows"]:
        for L, D, density in POINTS:
            if (row.get("kernel"), row.get("pattern"), row.get("L"), row.get("D")) == ("block_sparse_triton", "random", L, D) \
                    and row.get("density_target") == density:
                for mode in ("fwd", "fwdbwd"):
                    per_gpu.setdefault(gpu, {})[point_name(L, D, density, mode)] = row[f"{mode}_ms"]
for gpu, points in per_gpu.items():
    out = HERE / "baselines" / f"{gpu_key(gpu)}.json"
    out.write_text(json.dumps(dict(sorted(points.items())), indent=1) + "\n")
    print(f"{out}: {len(points)} points from {root}")

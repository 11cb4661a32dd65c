# The LRA `small` sweep exactly as run for results/lra/ (one H100; see docs/gpu_runs.md).
# Usage: bash scripts/lra_small_gpu.sh OUT_DIR [part]   (part: a | b | all)
out=${1:?out dir}; part=${2:-all}
common=(--scale small --data-dir .gpu/data --out "$out" --no-report --no-progress --resume)
if [ "$part" = a ] || [ "$part" = all ]; then
  python3 run_all.py --suite lra --tasks listops --methods dense:backend=cudnn dense:backend=flash flex \
      spion_cf spion_c spion_f bigbird local "${common[@]}"
  python3 run_all.py --suite lra --tasks pathfinder --methods dense flex spion_cf strided "${common[@]}"
fi
if [ "$part" = b ] || [ "$part" = all ]; then
  python3 run_all.py --suite lra --tasks image --methods dense flex spion_cf local "${common[@]}"
  python3 run_all.py --suite lra --tasks text --methods dense flex spion_cf bigbird "${common[@]}"
fi

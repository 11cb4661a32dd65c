# The LRA `small` sweep exactly as run for results/lra/ (one H100; see docs/gpu_runs.md).
# Usage: bash scripts/lra_small_gpu.sh OUT_DIR PART   (PART: listops | pathfinder | image | text | all)
# The method sets per task were cut to fit 30 minutes of rented GPU time (see reports/lra.md).
out=${1:?out dir}; part=${2:-all}
common=(--scale small --data-dir .gpu/data --out "$out" --no-report --no-progress --resume)
run() { [ "$part" = "$1" ] || [ "$part" = all ]; }
run listops && python3 run_all.py --suite lra --tasks listops "${common[@]}" \
    --methods dense:backend=cudnn dense:backend=flash flex spion_cf spion_c spion_f bigbird
run pathfinder && python3 run_all.py --suite lra --tasks pathfinder --methods dense spion_cf strided "${common[@]}"
run image && python3 run_all.py --suite lra --tasks image --methods dense spion_cf local "${common[@]}"
run text && python3 run_all.py --suite lra --tasks text --methods dense spion_cf bigbird "${common[@]}"
exit 0

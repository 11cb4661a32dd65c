# Named GPU run steps for a rented single-GPU box (docs/gpu_runs.md). Each step runs under `timeout` and, after
# it, every record so far is re-packed into $OUT/records.tgz, so a call cut off at its time limit still returns
# the finished runs.
# Usage: source scripts/gpu_setup.sh; bash scripts/gpu_steps.sh OUT_DIR STEP_SECONDS step[:seconds] [...]
# Steps: kernel_check spion_timing {listops,text,image,pathfinder}_matrix listops_dense listops_spion text_dense
#   text_spion image_seeds pathfinder_seeds mt qmsum glue_small glue_sst2 kernels moe_sweep ap_lm ap_glue ap_mt
#   dsti_sst2 ap_glue2 ap_mt_types ap_lm_high dsti_glue dsti_seeds
# Staged methods (AP, DSTI) keep their artifacts (the dense checkpoint, attention statistics, expert splits) in
# $SPARSEBENCH_ARTIFACTS inside the box's tree, so a tau sweep trains the dense model once per task and seed.
out=${1:?out dir}; limit=${2:?seconds per step}; shift 2
res=/tmp/sparsebench-results; mkdir -p "$res" "$out"
# SEED_RESULTS=1: copy the committed records in first (never over a file already there), so --resume skips the runs
# they hold by name. Names carry the config hash, not the GPU: an H100 record also skips the same run on the H200.
[ -n "$SEED_RESULTS" ] && cp -rn results/. "$res/"
export SPARSEBENCH_ARTIFACTS="${SPARSEBENCH_ARTIFACTS:-$PWD/.gpu_artifacts}"
common=(--scale small --data-dir .gpu/data --out "$res" --no-report --no-progress --resume ${DRY:+--dry-run})
minilm=model.pretrained=.gpu/all-MiniLM-L6-v2-fp16  # fp16 copy of the pip package's weights (carry limit)
AP=attention_pruning
# AP (issue 12): the spec's tau grid {0.2, 0.4, 0.6, 0.8} (+ eval-only sweeps of the tau-0.8 weights) and the
# RANDOM_PRUNE control; protocol=retrain (faithful: the masked stage repeats the dense budget from the same init)
# unless a step says otherwise. Every reduced budget is an override, so it is in each record's config.

step() {
  case "$1" in
    listops_dense) python3 run_all.py --suite lra --tasks listops --methods dense:backend=cudnn --seeds 0 1 2 "${common[@]}" ;;
    listops_spion) python3 run_all.py --suite lra --tasks listops --methods spion_cf --seeds 1 2 "${common[@]}" ;;
    text_dense)    python3 run_all.py --suite lra --tasks text --methods dense --seeds 0 1 2 "${common[@]}" ;;
    text_spion)    python3 run_all.py --suite lra --tasks text --methods spion_cf --seeds 1 2 "${common[@]}" ;;
    image_seeds)   python3 run_all.py --suite lra --tasks image --methods dense spion_cf --seeds 1 2 "${common[@]}" ;;
    pathfinder_seeds) python3 run_all.py --suite lra --tasks pathfinder --methods dense spion_cf --seeds 1 2 "${common[@]}" ;;
    spion_timing)  # SPION's sparse phase timed for sure (named deviation) + fixed patterns at SPION's density
                   python3 run_all.py --suite lra --tasks listops "${common[@]}" \
                       --methods spion_cf:max_dense_steps=500 local:density=0.05 bigbird:density=0.05 &&
                   python3 run_all.py --suite lra --tasks text "${common[@]}" \
                       --methods spion_cf:max_dense_steps=500 local:density=0.026 bigbird:density=0.026 ;;
    listops_matrix) python3 run_all.py --suite lra --tasks listops --methods local longformer strided "${common[@]}" ;;
    text_matrix)   python3 run_all.py --suite lra --tasks text --methods local longformer strided spion_c spion_f flex "${common[@]}" ;;
    image_matrix)  python3 run_all.py --suite lra --tasks image --methods bigbird longformer strided spion_c spion_f flex "${common[@]}" ;;
    pathfinder_matrix) python3 run_all.py --suite lra --tasks pathfinder --methods local longformer bigbird spion_c spion_f flex "${common[@]}" ;;
    flex_rest)     python3 run_all.py --suite lra --tasks text image --methods flex "${common[@]}" ;;
    flex_rerun)    # erratum 3: the Flex baseline with its BlockMask built once per batch (same config hashes)
                   python3 run_all.py --suite lra --tasks listops pathfinder text image --methods flex "${common[@]}" ;;
    mt)            python3 run_all.py --suite mt --methods dense "${common[@]}" ;;
    qmsum)         python3 run_all.py --suite summarization --tasks qmsum --methods dense "${common[@]}" ;;
    glue_small)    python3 run_all.py --suite glue --tasks cola mrpc rte stsb --methods dense "${common[@]}" "$minilm" ;;
    glue_sst2)     python3 run_all.py --suite glue --tasks sst2 --methods dense "${common[@]}" "$minilm" ;;
    kernels)       python3 run_all.py --suite kernels "${common[@]}" ;;
    moe_sweep)     python3 run_all.py --suite kernels --tasks moe_ffn_sweep "${common[@]}" ;;
    kernel_check)  # correctness (fwd + grads vs fp64) and the GPU regression gate, before any kernel timing
                   python3 -m kernels.gpu_check --parts correctness --out "$res/gpu_check" &&
                   python3 -m pytest -q -p no:cacheprovider tests/benchmarks/test_gpu_kernels.py ;;
    ap_lm)         # WikiText-2 (GPT decoder, small budget): retrain at 0.4 and 0.8, random control at 0.8, and the
                   # tau-0.8 masks on the block-sparse kernel, eval-only (protocol=inference: speed of the same masks)
                   python3 run_all.py --suite lm --tasks wikitext2 "${common[@]}" --methods dense:backend=flash \
                     "$AP:tau=0.8,sweep=0/0.2/0.4/0.6" "$AP:tau=0.4" "$AP:tau=0.8,control=random" \
                     "$AP:tau=0.8,mode=block_sparse,protocol=inference" ;;
    ap_glue)       # GLUE RTE, MRPC (MiniLM): dense fine-tune -> statistics -> re-fine-tune from the checkpoint
                   python3 run_all.py --suite glue --tasks ${GLUE_TASKS:-rte mrpc} "${common[@]}" "$minilm" \
                     --methods dense:backend=flash "$AP:tau=0.8,sweep=0/0.2/0.4/0.6" "$AP:tau=0.4" "$AP:tau=0.6" \
                     "$AP:tau=0.8,control=random" ;;
    ap_mt)         # Multi30k, one tau for enc self, dec self and cross (faithful); reduced: 2000 dense steps, the
                   # masked stage fine-tunes the dense checkpoint for 500 (protocol=finetune), greedy test decoding
                   o=(train.steps=2000 data.beam_size=1); m="$AP:protocol=finetune,masked_steps=500,masked_lr=3e-4"
                   python3 run_all.py --suite mt --tasks multi30k "${common[@]}" "${o[@]}" --methods dense:backend=flash \
                     "$m,tau=0.8,sweep=0/0.2/0.4/0.6" "$m,tau=0.4" "$m,tau=0.8,control=random" ;;
    dsti_sst2)     # DSTI vs the MoEfication baseline on SST-2 (MiniLM), reduced: 1000 steps per training stage
                   python3 run_all.py --suite glue --tasks sst2 "${common[@]}" "$minilm" train.steps=1000 \
                     --methods dense:backend=flash dsti dsti:pipeline=moefication ;;
    ap_glue2)      # GLUE SST-2 (1000 steps, as dsti_sst2), CoLA, STS-B: dense (auto, the fastest) -> retrain at 0.8
                   # with the eval-only sweep, at 0.5 (the claim's ~50 %), and the random control at 0.8
                   r=(--methods dense "$AP:tau=0.8,sweep=0/0.2/0.4/0.6" "$AP:tau=0.5" "$AP:tau=0.8,control=random")
                   python3 run_all.py --suite glue --tasks sst2 "${common[@]}" "$minilm" train.steps=1000 "${r[@]}" &&
                   python3 run_all.py --suite glue --tasks cola stsb "${common[@]}" "$minilm" "${r[@]}" ;;
    ap_mt_types)   # Multi30k (reduced as ap_mt): all three types at one tau (faithful) and each type alone at 0.8,
                   # each with the eval-only sweep of its weights; random control; dense (auto) as the fastest dense
                   o=(train.steps=2000 data.beam_size=1); m="$AP:protocol=finetune,masked_steps=500,masked_lr=3e-4"
                   w=sweep=0/0.2/0.4/0.6
                   python3 run_all.py --suite mt --tasks multi30k "${common[@]}" "${o[@]}" --methods dense \
                     "$m,tau=0.8,$w" "$m,tau=0.5" "$m,tau=0.8,control=random" "$m,tau=0.8,prune=enc_self,$w" \
                     "$m,tau=0.8,prune=dec_self,$w" "$m,tau=0.8,prune=cross,$w" ;;
    ap_lm_high)    # WikiText-2 at the claim's ~90 %: retrain at 0.9 and 0.95 (grid counting: the causal zeros are
                   # ~half the grid), the 0.95 weights swept eval-only at 0.5/0.8/0.9
                   python3 run_all.py --suite lm --tasks wikitext2 "${common[@]}" \
                     --methods "$AP:tau=0.95,sweep=0.5/0.8/0.9" "$AP:tau=0.9" ;;
    dsti_glue)     # DSTI and the MoEfication baseline on RTE, MRPC, CoLA, STS-B (small budgets); their dense (auto)
                   # H200 runs come from ap_glue2 (CoLA, STS-B) and the committed results/glue/h200 (RTE, MRPC)
                   python3 run_all.py --suite glue --tasks rte mrpc cola stsb "${common[@]}" "$minilm" \
                     --methods dsti dsti:pipeline=moefication ;;
    dsti_seeds)    # SST-2 seeds 1 and 2 at dsti_sst2's budget: dense (auto) and DSTI (MoEfication: seed 0 only)
                   python3 run_all.py --suite glue --tasks sst2 "${common[@]}" "$minilm" train.steps=1000 \
                     --seeds ${DSTI_SEEDS:-1 2} --methods dense dsti ;;
    ap_mt_lean)    # Multi30k AP without the dense baseline (committed: mt_multi30k__dense__small__s0__2eedc6450e):
                   # all three types at 0.8 (+ eval-only taus), then each type alone
                   o=(train.steps=2000 data.beam_size=1); m="$AP:protocol=finetune,masked_steps=500,masked_lr=3e-4"
                   python3 run_all.py --suite mt --tasks multi30k "${common[@]}" "${o[@]}" --methods "$m,tau=0.8,sweep=0.4/0.6" \
                     "$m,tau=0.8,prune=cross" "$m,tau=0.8,prune=enc_self" "$m,tau=0.8,prune=dec_self" \
                     "$m,tau=0.8,control=random" ;;
    ap_glue_rest)  # what ap_glue2 left: CoLA tau 0.5 and random, STS-B (dense + the three AP runs)
                   r=(--methods "$AP:tau=0.8,sweep=0/0.2/0.4/0.6" "$AP:tau=0.5" "$AP:tau=0.8,control=random")
                   python3 run_all.py --suite glue --tasks cola "${common[@]}" "$minilm" "${r[@]}" &&
                   python3 run_all.py --suite glue --tasks stsb "${common[@]}" "$minilm" --methods dense "${r[@]:1}" ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}

for arg in "$@"; do  # step or step:seconds
  s=${arg%%:*}; lim=${arg#*:}; [ "$lim" = "$arg" ] && lim=$limit
  echo "=== $s $(date +%T)"
  timeout -k 10 "$lim" bash -c "$(declare -p common minilm res AP); $(declare -f step); step $s" 2>&1 | tee -a "$out/log.txt"
  echo "=== $s exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$out/log.txt"
  tar czf "$out/records.tgz.tmp" -C "$res" . && mv "$out/records.tgz.tmp" "$out/records.tgz"
done

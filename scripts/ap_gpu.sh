# Attention Pruning (issue 12) GPU runs on a rented single-GPU box (docs/gpu_runs.md, "Attention Pruning").
# Usage: source scripts/gpu_setup.sh; bash scripts/ap_gpu.sh OUT_DIR STEP_SECONDS step [step ...]
# Steps: check lm mt glue glue_more (see below). Each step runs under `timeout`; after each one every
# record so far is re-packed into $OUT/records.tgz. The dense checkpoint and attention statistics of a task/seed are
# trained/collected once and reused by every tau (artifact cache in $SPARSEBENCH_ARTIFACTS, inside the box's tree),
# so a tau sweep costs one masked stage per tau. Budgets are reduced (small scale + the overrides below, all of them
# in each record's config); the dense baselines run with the same overrides in the same process order on the box.
out=${1:?out dir}; limit=${2:?seconds per step}; shift 2
res=/tmp/sparsebench-results; mkdir -p "$res" "$out"
export SPARSEBENCH_ARTIFACTS="${SPARSEBENCH_ARTIFACTS:-$PWD/.ap_artifacts}"
common=(--scale small --data-dir .gpu/data --out "$res" --no-report --no-progress --resume ${DRY:+--dry-run})
minilm=model.pretrained=.gpu/all-MiniLM-L6-v2-fp16
AP=attention_pruning
# reduced budgets (overridable from the environment); every override is in the records' configs
LM_STEPS=${LM_STEPS:-400}; LM_MASKED=${LM_MASKED:-100}
MT_STEPS=${MT_STEPS:-500}; MT_MASKED=${MT_MASKED:-150}; GLUE_TASKS=${GLUE_TASKS:-rte mrpc}
FT=protocol=finetune  # spec §2.4 ablation (b): fine-tune the dense checkpoint with the mask (budget: no retraining)

step() {
  case "$1" in
    check)   # kernel correctness on the new AP paths (fwd + grads vs fp64)
             python3 -m kernels.gpu_check --parts correctness --out "$res/gpu_check" ;;
    lm)      # WikiText-2: fine-tuned at tau 0.5/0.9/0.95 + random control at 0.9 (exact dense masking), eval-only
             # sweep 0/0.5/0.8/0.95 on the tau-0.9 weights, then the same masks on the block-sparse kernel (savings)
             o=(train.steps=$LM_STEPS); m="$AP:$FT,masked_steps=$LM_MASKED,masked_lr=3e-4"
             python3 run_all.py --suite lm --tasks wikitext2 "${common[@]}" "${o[@]}" --methods dense:backend=flash \
               "$m,tau=0.9,sweep=0/0.5/0.8/0.95" "$m,tau=0.9,control=random" "$m,tau=0.95" "$m,tau=0.5"
             python3 run_all.py --suite lm --tasks wikitext2 "${common[@]}" "${o[@]}" --methods \
               "$m,tau=0.9,mode=block_sparse" "$m,tau=0.95,mode=block_sparse" ;;
    mt)      # Multi30k: all three types at tau 0.5 (eval-only 0.2/0.8), then each type alone; greedy test decoding
             o=(train.steps=$MT_STEPS data.beam_size=1); m="$AP:$FT,masked_steps=$MT_MASKED,masked_lr=3e-4"
             python3 run_all.py --suite mt --tasks multi30k "${common[@]}" "${o[@]}" --methods dense:backend=flash \
               "$m,tau=0.5,sweep=0.2/0.8" "$m,tau=0.5,prune=cross" "$m,tau=0.5,prune=enc_self" "$m,tau=0.5,prune=dec_self" ;;
    glue)    # GLUE RTE, MRPC: re-fine-tune MiniLM with the mask (protocol=retrain), full small budget
             python3 run_all.py --suite glue --tasks $GLUE_TASKS "${common[@]}" "$minilm" --methods dense:backend=flash \
               "$AP:tau=0.5,sweep=0.2/0.8" "$AP:tau=0.5,control=random" ;;
    glue_more)
             python3 run_all.py --suite glue --tasks stsb cola "${common[@]}" "$minilm" --methods dense:backend=flash \
               "$AP:tau=0.5,sweep=0.2/0.8" ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}

for arg in "$@"; do  # step or step:seconds
  s=${arg%%:*}; lim=${arg#*:}; [ "$lim" = "$arg" ] && lim=$limit
  echo "=== $s $(date +%T)"
  timeout -k 10 "$lim" bash -c "$(declare -p common minilm res AP LM_STEPS LM_MASKED MT_STEPS MT_MASKED FT GLUE_TASKS); $(declare -f step); step $s" 2>&1 | tee -a "$out/log.txt"
  echo "=== $s exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$out/log.txt"
  tar czf "$out/records.tgz.tmp" -C "$res" . && mv "$out/records.tgz.tmp" "$out/records.tgz"
done

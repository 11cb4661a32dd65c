# Source on a rented GPU box that got a copy of this tree without .git (see docs/gpu_runs.md):
#   SPARSEBENCH_GIT_COMMIT=<hash> source scripts/gpu_setup.sh
# Installs the carried wheels (datasets and its two missing deps) and points caches at /tmp.
set -e
: "${SPARSEBENCH_GIT_COMMIT:?export SPARSEBENCH_GIT_COMMIT=<the commit this tree is at> first: records must name their code}"
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .gpu/wheels/*.whl
  export PYTHONPATH="$HOME/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export SPARSEBENCH_CACHE="${SPARSEBENCH_CACHE:-/tmp/sparsebench-cache}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
set +e

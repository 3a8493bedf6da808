#!/usr/bin/env bash
# GPU benchmarks on one H100/H200 (no network needed): pruning a LLaMA-2-7B-shaped model and 2:4 inference.
# Writes bench/results/gpu_<device>.json, and $OUT/gpu_<device>.json when OUT is set. Under 8 minutes.
#   bash bench/gpu.sh [bench_gpu.py options, e.g. --runs wanda:resident --skip sparse24]
set -uo pipefail
cd "$(dirname "$0")/.."

# The repository's own code, without installing it (torch and transformers are already there).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
"$PY" -c "import torch, transformers, wanda_core; assert torch.cuda.is_available(), 'no CUDA device'" || {
    echo "gpu.sh: needs torch with CUDA, transformers and wanda_core's light deps (numpy, tqdm, safetensors)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The Python side stops starting prune runs after --budget-s; the timeout is the hard stop (the JSON
# is rewritten after every stage, so a cut keeps what was measured).
timeout --signal=INT --kill-after=20 "${GPU_BENCH_TIMEOUT:-450}" "$PY" bench/bench_gpu.py --budget-s "${GPU_BENCH_BUDGET:-330}" "$@"
rc=$?
ls -l bench/results/gpu_*.json ${OUT:+"$OUT"} 2>/dev/null
exit $rc

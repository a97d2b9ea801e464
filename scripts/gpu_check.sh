#!/usr/bin/env bash
# One-GPU check (issue 10), under 5 minutes on one H200:
#   1. the CUDA tests (pytest -m gpu: bf16 vs fp32, SDPA kernels, optional Mamba kernels, grouped
#      expert GEMM, the SSD without host syncs);
#   2. benchmarks/gpu_check.py: training throughput of the S and B presets (images/s, TFLOP/s,
#      fraction of the bf16 dense peak) and hybrid vs attention-only vs DiT at 1024-16384 tokens.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (JSON and logs go there; default gpu_check/)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"

python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device (torch.cuda.is_available() is False)")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY

# The tests first (~1 min): a failure here makes the figures below meaningless.
timeout 150 python -m pytest -q -m gpu tests/ 2>&1 | tee "$out/pytest_gpu.log"

# Then the figures (~2-3 min); the JSON lines stream as each row finishes.
timeout 240 python benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"

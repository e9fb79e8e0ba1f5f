#!/usr/bin/env bash
# On a CUDA machine (under 8 minutes): chronos / recompute / offload exactness on the GPU, then the
# memory headline on the GPU with the process capped at ranks x budget, so the budget is real.
# Writes bench/results/memory_gpu.json. Not needed by `make test`; exits 2 without a GPU.
# (bench/gpu_check.sh is the runtime's check: exactness, recovery, throughput.)
#
#   bash bench/gpu_memory_check.sh     # PYTHON=... to pick the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! command -v "$PY" >/dev/null; then
    echo "gpu_check: no interpreter $PY (make the venv, or set PYTHON=...)" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; run it on a GPU machine" >&2
    exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
cat /proc/loadavg
SPOTPIPE_TEST_DEVICE=cuda timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_chronos_exact.py
timeout 170 "$PY" bench/memory.py --quick --device cuda --out bench/results/memory_gpu.json
cat /proc/loadavg

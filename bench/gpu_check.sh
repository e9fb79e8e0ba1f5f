#!/usr/bin/env bash
# spotpipe on a CUDA machine, in one short run (under 8 minutes on one GPU). Nothing in `make test`
# needs a GPU; exits 2 without one, 1 if a check fails.
#   1. the runtime (bench/gpu_check.py): pipeline vs single-process losses, a kill and recovery per
#      strategy, the mirror throughput bench, one table;
#   2. memory: chronos / recompute / offload exactness on the GPU, then bench/memory.py with the
#      process capped at ranks x budget (so the budget is real), into bench/results/memory_gpu.json.
#
#   bash bench/gpu_check.sh     # PYTHON=... to pick the interpreter (default .venv/bin/python)
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
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
echo "load average: $(cat /proc/loadavg)"
status=0
timeout 270 "$PY" bench/gpu_check.py || status=1
SPOTPIPE_TEST_DEVICE=cuda timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_chronos_exact.py || status=1
timeout 110 "$PY" bench/memory.py --quick --device cuda --out bench/results/memory_gpu.json || status=1
echo "load average: $(cat /proc/loadavg)"
exit $status

#!/usr/bin/env bash
# spotpipe on a CUDA machine, in one short run (under 8 minutes on one GPU): exactness against the
# single-process reference, a kill and recovery per strategy, and the mirror throughput bench.
# Needs a Python with a CUDA build of torch and spotpipe's dependencies: PYTHON=path/to/python.
# Prints one table; exits 1 if any check fails. Nothing in `make test` needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PYTHON" bench/gpu_check.py

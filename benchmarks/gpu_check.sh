#!/usr/bin/env bash
# The GPU check of the README's "Memory" section: a Llama-2-7B-shaped random bf16 model, an MI pass,
# one paper-preset round with 64 windows, and the same round under a 24 GB budget. A few minutes.
# Writes benchmarks/results/gpu_check.json. Needs a CUDA GPU with about 40 GB free.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
exec "$PY" benchmarks/gpu_check.py "$@"

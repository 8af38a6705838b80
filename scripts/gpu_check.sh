#!/usr/bin/env bash
# A few steps of every paper-scale stage on one GPU (benchmark/gpu_check.py): finite losses,
# throughput, peak memory and MFU against the bf16 peak, written to results/perf/gpu-<gpu>.md/.json.
# Budget: at most 8 minutes (the hard limit below); typically the model builds and 6 steps of
# each of the 7 stage kinds. Run from the repository root after `make install`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec timeout 480 "$PY" -m benchmark.gpu_check --out results/perf "$@"

#!/usr/bin/env bash
# GPU check (issue 8): the full-size SD 1.5 UNet with random weights, fp16, 512x512, classifier-free
# guidance (batch 2), eager and torch.compile'd: steps per second and the fraction of the GPU's peak.
# Runs in under 8 minutes on one NVIDIA GPU; extra arguments go to tools/gpu_check.py
# (e.g. --no-compile, --steps 50, --json bench-results/gpu.json; --dry-run checks it on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --dry-run "* ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
# 470 s: the whole check stays under 8 minutes even if compiling hangs; the eager figure prints first.
exec timeout --signal=INT --kill-after=10 470 python tools/gpu_check.py "$@"

#!/usr/bin/env bash
# The GPU conformance run: torch-cuda (strict float32) and torch-cuda-tf32 (float32 with
# TF32 products, judged with TF32's unit roundoff 2^-11), every dtype each declares;
# jax-cuda and onnxruntime-cuda too when their CUDA builds are installed. 100 examples
# per check (LMSPEC_GPU_EXAMPLES), as the committed CPU reports were run, so that every
# check draws the same inputs as theirs.
#
#   bash benchmarks/gpu_conformance.sh [OUT_DIR]        (default OUT_DIR: reports/gpu)
#
# On a fresh machine with an NVIDIA GPU it makes a virtualenv (.venv-gpu) and installs
# lmspec with PyPI's default (CUDA) torch build; where lmspec and a CUDA torch are
# already importable (LMSPEC_GPU_NO_INSTALL=1), it uses them. Workers: one per 2 CPU
# cores, at most 8 (each holds a CUDA context). Budget: under 10 minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-reports/gpu}
mkdir -p "$out"

if [ "${LMSPEC_GPU_NO_INSTALL:-0}" != 1 ]; then
  python3 -m venv .venv-gpu
  . .venv-gpu/bin/activate
  # no constraints file: it pins torch's CPU build
  pip install -q -e ".[test]" "numpy==2.4.6" "hypothesis==6.170.15"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python - <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PY

cores=$(nproc)
jobs=$(( cores / 2 ))
[ "$jobs" -lt 1 ] && jobs=1
[ "$jobs" -gt 8 ] && jobs=8

lmspec backends
status=0
for b in torch-cuda torch-cuda-tf32 jax-cuda onnxruntime-cuda; do
  if lmspec backends --json | python -c "import json,sys; sys.exit(0 if any(r['name'] == '$b' and r['status'] == 'ok' for r in json.load(sys.stdin)) else 1)"; then
    echo "== $b"
    lmspec run --backend "$b" --jobs "$jobs" --timeout 120 --max-examples "${LMSPEC_GPU_EXAMPLES:-100}" \
      --report-dir "$out" || status=$?
  else
    echo "== $b: not available here, skipped"
  fi
done
ls -l "$out"
exit "$status"

#!/usr/bin/env bash
# GPU check of issue 7: rows 2 (training throughput, TFLOP/s vs measured bf16 peak, CUDA graphs and
# torch.compile vs eager), 3 (packing 1/2/4/8 processes), 4 (inference) and 7 (study projection) on
# full-size synthetic data generated in memory. For a machine with PyTorch and nothing of ours: the
# checkout goes on PYTHONPATH; pydantic (everest.config) comes from wheels in .whl/ if missing
# (see benchmarks/RESULTS.md). Usage: benchmarks/gpu_check.sh [OUTDIR]   (default $OUT). ~4-6 minutes.
# On CPU, for a dry run: DEVICE=cpu GPU_CHECK_ARGS='--quick --size tiny' benchmarks/gpu_check.sh /tmp/x
set -uo pipefail
cd "$(dirname "$0")/.."
outdir=${1:-${OUT:-/tmp/everest-gpu-check}}
mkdir -p "$outdir"
py=${PYTHON:-python3}
if ! "$py" -c "import pydantic, yaml" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/everest-site .whl/*.whl \
      || { echo "installing the carried wheels failed"; exit 3; }
    export PYTHONPATH=/tmp/everest-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "pydantic is missing and no wheels were carried in .whl/ (see benchmarks/RESULTS.md)"; exit 3
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || echo "nvidia-smi not available"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 460 "$py" -m benchmarks --rows 2,3,4,7 --device "${DEVICE:-cuda}" --out "$outdir" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$outdir/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# GPU check of the benchmark suite: rows 2 (training throughput, TFLOP/s vs measured bf16 peak, CUDA graphs and
# torch.compile vs eager), 3 (packing 1/2/4/8 processes), 4 (inference) and 7 (study projection) on
# full-size synthetic data generated in memory, then the real trainer (M-24, 3 epochs) eager vs graphs, then
# the gpu-marked tests.
# For a machine with PyTorch and nothing of ours: the checkout goes on PYTHONPATH; pydantic
# (everest.config) comes from wheels in .whl/ if missing (see benchmarks/RESULTS.md).
# Usage: benchmarks/gpu_check.sh [OUTDIR]   (default $OUT). ~5.5 minutes.
# On CPU, for a dry run: DEVICE=cpu GPU_CHECK_ARGS='--quick --size tiny' benchmarks/gpu_check.sh /tmp/x
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
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
# shellcheck disable=SC2086  # GPU_CHECK_ARGS holds several options
timeout "${BENCH_TIMEOUT:-330}" "$py" -m benchmarks --rows 2,3,4,7 --device "${DEVICE:-cuda}" --out "$outdir" \
  ${GPU_CHECK_ARGS:-} 2>&1 | tee "$outdir/gpu_check.log"
status=${PIPESTATUS[0]}

# The real trainer end to end on full-size data (M-24, a few epochs), eager then CUDA graphs: per-epoch
# samples/s of ProductionTrainer itself (data on the device, bf16 autocast), not of a benchmark loop.
data=/tmp/everest-gpu-data
"$py" -m everest data synth --size "${TRAIN_SIZE:-full}" --out "$data" >/dev/null || status=1
for mode in eager graphs; do
  flag=false; [ "$mode" = graphs ] && flag=true
  timeout "${TRAIN_TIMEOUT:-90}" "$py" -m everest train --flare_class M --time_window 24 --seed 0 \
    --device "${DEVICE:-cuda}" --epochs "${TRAIN_EPOCHS:-3}" --data-dir "$data" --output-dir "/tmp/everest-gpu-$mode" \
    --set train.cuda_graphs=$flag >"$outdir/train_$mode.log" 2>&1 || { echo "trainer ($mode) failed"; status=1; }
  cp /tmp/everest-gpu-$mode/results/everest_M_24h_seed0/results.json "$outdir/train_$mode.json" 2>/dev/null
  "$py" - "$outdir/train_$mode.json" "$mode" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
for h in r["history"]:
    print(f"trainer {sys.argv[2]}: epoch {h['epoch']} {h['samples_per_s']:,.0f} samples/s {h['seconds']:.1f} s "
          f"val_tss {h['val_tss']:.3f}")
print(f"trainer {sys.argv[2]}: test TSS {r['test_metrics']['tss']:.3f} device {r['provenance'].get('device')}")
PY
done

# The gpu test tier (CUDA-graph step vs eager, a trainer run on CUDA): skipped everywhere without a GPU.
if "$py" -c "import pytest" 2>/dev/null; then
  timeout "${GPU_TEST_TIMEOUT:-120}" "$py" -m pytest -q -m gpu -rs tests/test_gpu.py 2>&1 | tee "$outdir/gpu_tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu tests failed"; status=1; }
else
  echo "pytest is not installed: gpu test tier not run"
fi
exit "$status"

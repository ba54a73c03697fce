#!/usr/bin/env bash
# GPU check, one prepared script: provenance, the gpu-marked test tier, row 8 (the grouped trainer vs the same
# experiments as solo runs: aggregate samples/s at K=1,5,9,45 on full-size synthetic tables, the production
# model with CUDA graphs and bf16 autocast, and the study projection), rows 2, 4 and 7 (training throughput,
# inference, study projection; --quick), then, time permitting, the wall time of a whole 45-experiment study.
#
# Provenance: every output names `git rev-parse HEAD`, whether the tree is dirty (`git status --porcelain`,
# carried wheels in .whl/ aside) and torch.__version__ (provenance.txt, and each benchmarks.json's
# environment). A dirty tree is refused (exit 4) so GPU numbers always name committed code; ALLOW_DIRTY=1
# runs anyway and marks every output "NOT COMMITTED". Where the copy has no .git, GPU_CHECK_COMMIT=<sha>
# (from a clean checkout) is recorded as stated by the caller; without it the run is refused likewise.
#
# Budget: a task is lent 15 min of device time in all, machine start and a rerun included, so this script
# keeps to GPU_CHECK_BUDGET=540 s (9 min) overall; each step gets the smaller of its cap and what is left:
#   gpu test tier            cap  60 s  (tiny trainer runs on CUDA, graph vs eager steps; ~30 s)
#   row 8, grouped vs solo   cap 390 s  (full-size tables written once, ~40 s, and parsed in parallel; then
#                                        K=1,5,9,45 in that order, 2 epochs, 1 repeat, the solo side at most 3
#                                        runs per K: a solo run's rate does not depend on K. Each full-size
#                                        member costs seconds of data preparation and evaluation outside the
#                                        measured epochs, so K=45 comes last and may be cut: the log says so,
#                                        and GROUP_ARGS='--group-ks 45' measures it alone in another session)
#   rows 2, 4, 7 (--quick)   cap 120 s  (what is left; rows already written stay)
#   whole study (45 x up to 120 epochs, early stopping on, one group): only when what is left exceeds row 8's
#     projected grouped study time (an upper bound) + 60 s, or with STUDY=1 (up to what is left)
# Each step runs under `timeout` (SIGTERM, then SIGKILL 15 s later: the trainers checkpoint on SIGTERM), so
# the worst case is 540 s + 15 s per step; give the device call a 600 s limit. benchmarks.json is rewritten
# after every row and every K of row 8, so a step stopped at its cap keeps what it measured.
#
# For a machine with PyTorch and nothing of ours: the checkout goes on PYTHONPATH; pydantic and PyYAML come
# from wheels in .whl/ if missing. Usage: benchmarks/gpu_check.sh [OUTDIR]   (default $OUT).
# On CPU, for a dry run: DEVICE=cpu ALLOW_DIRTY=1 GPU_CHECK_ARGS='--size tiny' GROUP_ARGS='--group-ks 1,2'
#   benchmarks/gpu_check.sh /tmp/x
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
outdir=${1:-${OUT:-/tmp/everest-gpu-check}}
mkdir -p "$outdir"
exec > >(tee -a "$outdir/gpu_check.log") 2>&1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
budget=${GPU_CHECK_BUDGET:-540}
start=$SECONDS
status=0

# ---- provenance: the exact code and torch these numbers come from
if commit=$(git rev-parse HEAD 2>/dev/null); then
  dirty=$(git status --porcelain 2>/dev/null | grep -v ' \.whl/' || true)
  tree=$([ -z "$dirty" ] && echo clean || echo dirty)
elif [ -n "${GPU_CHECK_COMMIT:-}" ]; then
  commit=$GPU_CHECK_COMMIT dirty="" tree="stated by the caller (no git checkout here)"
else
  commit=unknown dirty="" tree="unknown (no git checkout here, no GPU_CHECK_COMMIT)"
fi
if [ "$tree" != clean ] && [[ "$tree" != stated* ]]; then
  if [ "${ALLOW_DIRTY:-0}" != 1 ]; then
    echo "refused: the tree is $tree at $commit; GPU rows must name committed code (ALLOW_DIRTY=1 overrides)"
    [ -n "$dirty" ] && echo "$dirty"
    exit 4
  fi
  tree="NOT COMMITTED: $tree (ALLOW_DIRTY=1); these numbers name no commit"
  echo "WARNING: $tree"
fi

if ! "$py" -c "import pydantic, yaml" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/everest-site .whl/*.whl \
      || { echo "installing the carried wheels failed"; exit 3; }
    export PYTHONPATH=/tmp/everest-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "pydantic is missing and no wheels were carried in .whl/"; exit 3
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $commit"
  echo "tree: $tree"
  [ -n "$dirty" ] && printf 'changed:\n%s\n' "$dirty"
  "$py" -c "import platform, torch; print('torch:', torch.__version__, '| python:', platform.python_version(),
'| cuda:', torch.version.cuda, torch.cuda.is_available())"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi not available"
} | tee "$outdir/provenance.txt"

# step NAME CAP CMD...: run CMD under the smaller of CAP and the budget left; skip it when under 15 s are left.
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$((budget - (SECONDS - start)))
  ((left < cap)) && cap=$left
  if ((cap < 15)); then echo "== $name: skipped, under 15 s left for it (budget $budget s)"; return 0; fi
  echo "== $name (up to $cap s; $((SECONDS - start)) s used)"
  timeout -k 15 "$cap" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "== $name: stopped at its cap of $cap s (partial results kept)"
  ((rc != 0)) && { echo "== $name: exit status $rc"; status=1; }
  return 0
}

# ---- the gpu test tier: every test file with gpu-marked tests (skipped everywhere without a GPU)
if "$py" -c "import pytest" 2>/dev/null; then
  mapfile -t gpu_tests < <(grep -l 'mark.gpu' tests/test_*.py)
  step "gpu tests" "${GPU_TEST_CAP:-60}" "$py" -m pytest -q -m gpu -rs -p no:cacheprovider "${gpu_tests[@]}"
else
  echo "pytest is not installed: gpu test tier not run"; status=1
fi

# ---- row 8: grouped trainer vs solo runs (full-size tables kept for the study below)
data=/tmp/everest-gpu-data
# shellcheck disable=SC2086  # GPU_CHECK_ARGS and GROUP_ARGS hold several options
step "row 8: grouped vs solo" "${GROUP_CAP:-390}" "$py" -m benchmarks --rows 8 --device "$device" \
  --out "$outdir/grouped" --group-data "$data" --group-epochs 2 --group-reps 1 --group-solo-max 3 \
  ${GPU_CHECK_ARGS:-} ${GROUP_ARGS:-}

# ---- rows 2, 4, 7: training throughput (graphs, compile, eager vs the reference loop), inference, projection
# shellcheck disable=SC2086
step "rows 2, 4, 7" "${SUITE_CAP:-120}" "$py" -m benchmarks --rows 2,4,7 --quick --device "$device" \
  --out "$outdir/suite" ${GPU_CHECK_ARGS:-}

# ---- time permitting: the whole study as one group of 45, production settings (early stopping on)
projected=$("$py" -c "import json, sys
rows = json.load(open(sys.argv[1]))['rows']
print(int(next(r['ours'] for r in rows if r['name'].startswith('study projection'))))" \
  "$outdir/grouped/benchmarks.json" 2>/dev/null || echo 0)
left=$((budget - (SECONDS - start)))
tables=$(find "$data" -maxdepth 1 -name 'data-*' -type d 2>/dev/null | sort | head -1)  # data-full on a GPU
if [ -z "$tables" ]; then
  echo "== whole study: skipped (row 8 wrote no tables)"
elif [ "${STUDY:-0}" = 1 ] || { ((projected > 0)) && ((left > projected + 60)); }; then
  step "whole study, 45 experiments as one group" "$left" "$py" - "$tables" "$device" \
    "$outdir/study.json" <<'PY'
import json
import sys
import time

from everest.config import EverestConfig, Experiment
from everest.errors import Preempted
from everest.training.group import train_group

data, device, out = sys.argv[1:4]
exps = [Experiment.from_array_index(i) for i in range(1, 46)]
t0 = time.perf_counter()
try:
    res = train_group(exps, config=EverestConfig().with_overrides({"train.device": device}), data_dir=data,
                      output_dir="/tmp/everest-gpu-study", force=True)
except Preempted as err:  # the step's cap: record a lower bound, not a study time
    json.dump({"finished": 0, "stopped_after_s": time.perf_counter() - t0, "reason": str(err)[:300]},
              open(out, "w"), indent=2)
    print(f"whole study: not finished within {time.perf_counter() - t0:.0f} s (a lower bound)")
    sys.exit(124)
wall = time.perf_counter() - t0
done = [m.results for m in res if m.results is not None]
summary = {"wall_s": wall, "finished": len(done), "failed": [f"{m.experiment.name}: {m.error}" for m in res
                                                             if m.results is None],
           "epochs_run": [len(r["history"]) for r in done]}
json.dump(summary, open(out, "w"), indent=2)
print(f"whole study: {len(done)} of 45 finished in {wall:.0f} s; epochs run {min(summary['epochs_run'], default=0)}"
      f"-{max(summary['epochs_run'], default=0)}")
PY
else
  echo "== whole study: skipped (projected upper bound ${projected} s, $left s of the budget left; STUDY=1 forces it)"
fi
echo "== done in $((SECONDS - start)) s; commit $commit, tree $tree"
exit "$status"

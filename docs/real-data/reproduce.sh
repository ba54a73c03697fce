#!/usr/bin/env bash
# EVEREST's verdict on real flares: >= M in 24 h over the five region-disjoint SMARP folds of Sun et al. (2022).
# Per fold: import, train the seeds as one group, fit the baselines, build the seed ensemble and analyse; then
# pool the five test folds. Usage (from the project root, with the project's environment active):
#   docs/real-data/reproduce.sh SRC [OUT]     SRC: the folder holding smarp_0.csv .. smarp_4.csv
# Budget: EPOCHS (default 2) epochs of the demo preset (the design's recipe, capped), SEEDS (default "0 1 2"),
# DEVICE (default auto); SET="key=value ..." adds configuration overrides to the training (e.g. a tuned recipe).
set -euo pipefail
SRC=${1:?usage: reproduce.sh SRC [OUT] (SRC holds smarp_0.csv .. smarp_4.csv)}
OUT=${2:-study-smarp}
EPOCHS=${EPOCHS:-2}
read -r -a SEEDS <<<"${SEEDS:-0 1 2}"
PY=${PY:-python}
EXTRA=()
[[ -n ${SET:-} ]] && for kv in $SET; do EXTRA+=(--set "$kv"); done

"$PY" -m everest data import smarp "$SRC" --out "$OUT/data"
folds=()
for data in "$OUT"/data/fold_*; do
    fold=$(basename "$data"); run=$OUT/$fold; folds+=("$run")
    common=(--flare-class M --time-window 24 --data-dir "$data" --config "$data/everest.yaml" --output-dir "$run")
    "$PY" -m everest train "${common[@]}" --seed "${SEEDS[@]}" --preset demo --epochs "$EPOCHS" \
        --device "${DEVICE:-auto}" ${EXTRA[@]+"${EXTRA[@]}"}
    for seed in "${SEEDS[@]}"; do
        "$PY" -m everest baselines "${common[@]}" --seed "$seed"
    done
    "$PY" -m everest ensemble --output-dir "$run" --targets M-24
    "$PY" -m everest.analysis --results-dir "$run/results" --targets M-24 --seeds "${SEEDS[@]}" --no-plots
done
"$PY" -m everest.analysis.folds "${folds[@]}" --out "$OUT/pooled" --target M-24

#!/usr/bin/env bash
# Rebuilds docs/results.md: e2e, dgl, mlaan-dgl, infopro and mlaan-infopro on the full
# Fashion-MNIST (ResNet-32, K=8, same epochs, batch, learning rate and seed for all), then the
# table from the runs' summary.json files. Runs that already have a summary are kept, so the
# script can be stopped and started again.
#
#   scripts/results.sh                 # 1 epoch, seed 0
#   EPOCHS=2 SEEDS="0 1" scripts/results.sh
#   JOBS=2 SEEDS="0 1" scripts/results.sh   # two trainings at once, the cores shared out
#
# RUNS lists what to train, longest first so that parallel lanes finish close together; an
# entry `method:d=N` is that MLAAN method with cascade depth N (the reference code's InfoPro
# variant uses d=3, its DGL variant d=2, the default here).
#
# With JOBS > 1 each training gets cores/JOBS intra-op threads and writes its log to
# <run dir>.log; the arithmetic of a run does not depend on its thread count beyond float
# summation order.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EPOCHS=${EPOCHS:-1}
SEEDS=${SEEDS:-0}
OUT=${OUT:-runs/results}
CONFIG=${CONFIG:-configs/results-fashion-resnet32.toml}
BIN=${MLAAN_PIPE:-target/release/mlaan-pipe}
JOBS=${JOBS:-1}
RUNS=${RUNS:-"dgl mlaan-infopro mlaan-dgl infopro e2e mlaan-infopro:d=3"}

[ -x "$BIN" ] || make build

extra=()
if [ "$JOBS" -gt 1 ]; then
    threads=$(( $(nproc) / JOBS ))
    extra=(--set "pipeline.intra_op_threads=$(( threads > 0 ? threads : 1 ))")
fi

train() { # method[:d=N] seed dir
    local method=${1%%:*} k=8 depth=()
    [ "$method" = e2e ] && k=1
    [ "$1" != "$method" ] && depth=(--set "method.cascade_depth=${1##*:d=}")
    "$BIN" train --config "$CONFIG" --method "$method" --k "$k" --seed "$2" \
        --epochs "$EPOCHS" --out "$3" "${extra[@]}" "${depth[@]}"
}

running=0
for seed in $SEEDS; do
    for run in $RUNS; do
        dir="$OUT/e${EPOCHS}/${run/:d=/-d}-seed$seed"
        if [ -f "$dir/summary.json" ]; then
            echo "== $dir done"
            continue
        fi
        if [ "$JOBS" -le 1 ]; then
            echo "== $run seed $seed ($EPOCHS epochs) -> $dir"
            train "$run" "$seed" "$dir"
            continue
        fi
        if [ "$running" -ge "$JOBS" ]; then
            wait -n
            running=$((running - 1))
        fi
        echo "== $run seed $seed ($EPOCHS epochs) -> $dir (log: $dir.log)"
        mkdir -p "$(dirname "$dir")"
        train "$run" "$seed" "$dir" >"$dir.log" 2>&1 &
        running=$((running + 1))
    done
done
# A failed training fails the script.
while [ "$running" -gt 0 ]; do
    wait -n
    running=$((running - 1))
done

"$BIN" compare "$OUT/e${EPOCHS}"/*/ --markdown docs/results.md \
    --title "Local learning on Fashion-MNIST: ResNet-32, K=8, $EPOCHS epoch(s)" \
    --command "$([ "$JOBS" -gt 1 ] && echo "JOBS=$JOBS ")EPOCHS=$EPOCHS SEEDS=\"$SEEDS\" scripts/results.sh"

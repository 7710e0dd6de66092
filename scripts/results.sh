#!/usr/bin/env bash
# Rebuilds docs/results.md: e2e, dgl, mlaan-dgl, infopro and mlaan-infopro on the full
# Fashion-MNIST (ResNet-32, K=8, same epochs, batch, learning rate and seed for all), then the
# table from the runs' summary.json files. Runs that already have a summary are kept, so the
# script can be stopped and started again.
#
#   scripts/results.sh                 # 1 epoch, seed 0
#   EPOCHS=2 SEEDS="0 1" scripts/results.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EPOCHS=${EPOCHS:-1}
SEEDS=${SEEDS:-0}
OUT=${OUT:-runs/results}
CONFIG=${CONFIG:-configs/results-fashion-resnet32.toml}
BIN=${MLAAN_PIPE:-target/release/mlaan-pipe}

[ -x "$BIN" ] || make build

for seed in $SEEDS; do
    for method in e2e dgl mlaan-dgl infopro mlaan-infopro; do
        k=8
        [ "$method" = e2e ] && k=1
        dir="$OUT/e${EPOCHS}/$method-seed$seed"
        if [ -f "$dir/summary.json" ]; then
            echo "== $dir done"
            continue
        fi
        echo "== $method seed $seed ($EPOCHS epochs) -> $dir"
        "$BIN" train --config "$CONFIG" --method "$method" --k "$k" --seed "$seed" \
            --epochs "$EPOCHS" --out "$dir"
    done
done

"$BIN" compare "$OUT/e${EPOCHS}"/*/ --markdown docs/results.md \
    --title "Local learning on Fashion-MNIST: ResNet-32, K=8, $EPOCHS epoch(s)" \
    --command "EPOCHS=$EPOCHS SEEDS=\"$SEEDS\" scripts/results.sh"

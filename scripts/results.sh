#!/usr/bin/env bash
# Rebuilds docs/results.md from the runs' summary.json files, one section per part:
#
#   methods   e2e, dgl, mlaan-dgl, infopro and mlaan-infopro on the full Fashion-MNIST
#             (ResNet-32, K=8, the same epochs, batch, learning rate and seeds for all);
#   ablation  mlaan-dgl at K=8 under sequential, sync and async (2 CPU stages), EMA twins
#             `all` against `last`, and one module per block (K=15) for dgl and mlaan-dgl,
#             beside e2e;
#   auglocal  AugLocal and MLAAN on it beside e2e, dgl, infopro and mlaan-dgl, at K=8 and
#             K=16 (InfoPro's splits);
#   vit       e2e, dgl and mlaan-dgl on a small-image ViT at K=4
#             (configs/results-fashion-vit.toml);
#   vgg       the same on a CIFAR-form VGG-13 (configs/results-fashion-vgg13.toml).
#
# Runs that already have a summary are kept (a run shared by two parts trains once), so
# the script can be stopped and started again; each section is rewritten from its own runs
# only, the rest of the page is kept.
#
#   scripts/results.sh                         # 1 epoch, seed 0, the methods, ablation and auglocal parts
#   SEEDS="0 1" PARTS=ablation scripts/results.sh
#   JOBS=2 SEEDS="0 1" scripts/results.sh      # two trainings at once, the cores shared out
#
# An entry is `method[:option,option...]`; the options:
#   d=N          MLAAN cascade depth N (the reference code's InfoPro variant uses 3)
#   k=N          N modules (default the part's: 8, or 4 for vit and vgg; e2e is always 1)
#   split=NAME   the split (default the config's, InfoPro's K=8 split)
#   lam=SOURCE   where MLAAN's LAM chains come from (`official`: the official code's tables)
#   schedule=S   sync or async over 2 CPU stages (default sequential, one thread of work)
#   ema=RULE     method.ema_update (all, last, none)
# Entries are listed longest first so that parallel lanes finish close together.
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
PARTS=${PARTS:-"methods ablation auglocal"}
VIT_CONFIG=${VIT_CONFIG:-configs/results-fashion-vit.toml}
VGG_CONFIG=${VGG_CONFIG:-configs/results-fashion-vgg13.toml}
BACKBONES=${BACKBONES:-"e2e dgl mlaan-dgl"}
METHODS=${METHODS:-"dgl mlaan-infopro mlaan-dgl infopro e2e mlaan-infopro:d=3"}
ABLATION=${ABLATION:-"mlaan-dgl:k=15,split=every-block,lam=official mlaan-dgl:schedule=sync mlaan-dgl:schedule=async mlaan-dgl:ema=last mlaan-dgl dgl:k=15,split=every-block e2e"}
AUGLOCAL=${AUGLOCAL:-"mlaan-auglocal:k=16 mlaan-dgl:k=16 mlaan-auglocal mlaan-dgl auglocal:k=16 infopro:k=16 auglocal infopro dgl:k=16 dgl e2e"}
PAGE=${PAGE:-docs/results.md}

[ -x "$BIN" ] || make build

extra=()
if [ "$JOBS" -gt 1 ]; then
    threads=$(( $(nproc) / JOBS ))
    extra=(--set "pipeline.intra_op_threads=$(( threads > 0 ? threads : 1 ))")
fi

# The config and default K of a part, and the tag its run directories carry (the ResNet-32
# parts share theirs).
part_config() { case "$1" in vit) echo "$VIT_CONFIG" ;; vgg) echo "$VGG_CONFIG" ;; *) echo "$CONFIG" ;; esac; }
part_k() { case "$1" in vit | vgg) echo 4 ;; *) echo 8 ;; esac; }
part_tag() { case "$1" in vit | vgg) echo "$1-" ;; *) echo "" ;; esac; }

run_dir() { # entry seed part
    local name=${1//:/-}
    name=${name//,/-}
    echo "$OUT/e${EPOCHS}/$(part_tag "$3")${name//=/}-seed$2"
}

train() { # entry seed dir part
    local method=${1%%:*} opts="" args=()
    [[ "$1" == *:* ]] && opts=${1#*:}
    local opt
    for opt in ${opts//,/ }; do
        case "$opt" in
            d=*) args+=(--set "method.cascade_depth=${opt#d=}") ;;
            k=*) ;; # entry_k reads it
            split=*) args+=(--set "model.split=\"${opt#split=}\"") ;;
            lam=*) args+=(--set "method.lam.source=\"${opt#lam=}\"") ;;
            schedule=*) args+=(--schedule "${opt#schedule=}" --devices cpu,cpu) ;;
            ema=*) args+=(--set "method.ema_update=\"${opt#ema=}\"") ;;
            *) echo "results.sh: unknown option \`$opt\` in \`$1\`" >&2; return 2 ;;
        esac
    done
    "$BIN" train --config "$(part_config "$4")" --method "$method" --k "$(entry_k "$1" "$4")" --seed "$2" \
        --epochs "$EPOCHS" --out "$3" "${extra[@]}" "${args[@]}"
}

# The K an entry trains: its `k=` option, else the part's; e2e is one module.
entry_k() { # entry part
    local k
    k=$(part_k "$2")
    [[ "$1" == *k=* ]] && { k=${1#*k=}; k=${k%%,*}; }
    [ "${1%%:*}" = e2e ] && k=1
    echo "$k"
}

# The K values a part's local-method entries train, as "8 and K=16".
part_ks() { # part
    local entry k ks=()
    for entry in $(entries "$1"); do
        [ "${entry%%:*}" = e2e ] && continue
        k=$(entry_k "$entry" "$1")
        [[ " ${ks[*]} " == *" $k "* ]] || ks+=("$k")
    done
    printf '%s\n' "${ks[@]}" | sort -n | paste -sd, | sed 's/,/ and K=/g'
}

entries() { # part
    case "$1" in
        methods) echo "$METHODS" ;;
        ablation) echo "$ABLATION" ;;
        auglocal) echo "$AUGLOCAL" ;;
        vit | vgg) echo "$BACKBONES" ;;
        *) echo "results.sh: unknown part \`$1\` (methods, ablation, auglocal, vit, vgg)" >&2; exit 2 ;;
    esac
}

# Every run of the chosen parts once (`part/entry`; parts whose runs share directories, as
# the ResNet-32 ones do, train a shared entry once), in order, then each seed.
todo=()
seen=" "
for part in $PARTS; do
    for entry in $(entries "$part"); do
        key="$(part_tag "$part")$entry"
        [[ "$seen" == *" $key "* ]] && continue
        seen+="$key "
        todo+=("$part/$entry")
    done
done

running=0
for seed in $SEEDS; do
    for item in "${todo[@]}"; do
        part=${item%%/*}
        entry=${item#*/}
        dir=$(run_dir "$entry" "$seed" "$part")
        if [ -f "$dir/summary.json" ]; then
            echo "== $dir done"
            continue
        fi
        if [ "$JOBS" -le 1 ]; then
            echo "== $entry seed $seed ($EPOCHS epochs) -> $dir"
            train "$entry" "$seed" "$dir" "$part"
            continue
        fi
        if [ "$running" -ge "$JOBS" ]; then
            wait -n
            running=$((running - 1))
        fi
        echo "== $entry seed $seed ($EPOCHS epochs) -> $dir (log: $dir.log)"
        mkdir -p "$(dirname "$dir")"
        train "$entry" "$seed" "$dir" "$part" >"$dir.log" 2>&1 &
        running=$((running + 1))
    done
done
# A failed training fails the script.
while [ "$running" -gt 0 ]; do
    wait -n
    running=$((running - 1))
done

command="$([ "$JOBS" -gt 1 ] && echo "JOBS=$JOBS ")EPOCHS=$EPOCHS SEEDS=\"$SEEDS\""
for part in $PARTS; do
    dirs=()
    for entry in $(entries "$part"); do
        for seed in $SEEDS; do dirs+=("$(run_dir "$entry" "$seed" "$part")"); done
    done
    case "$part" in
        methods) title="Methods: ResNet-32, K=$(part_ks methods), $EPOCHS epoch(s)" ;;
        ablation) title="Ablation of mlaan-dgl: schedule, EMA twins, one module per block ($EPOCHS epoch(s))" ;;
        auglocal) title="AugLocal: ResNet-32, K=$(part_ks auglocal), $EPOCHS epoch(s)" ;;
        vit) title="ViT: $(sed -n 's/^arch = "\(.*\)"/\1/p' "$VIT_CONFIG"), K=$(part_ks vit), $EPOCHS epoch(s)" ;;
        vgg) title="VGG: $(sed -n 's/^arch = "\(.*\)"/\1/p' "$VGG_CONFIG"), K=$(part_ks vgg), $EPOCHS epoch(s)" ;;
    esac
    "$BIN" compare "${dirs[@]}" --markdown "$PAGE" --section "$part" --title "$title" \
        --command "$command PARTS=$part scripts/results.sh" >/dev/null
    echo "== $PAGE: section $part from ${#dirs[@]} runs"
done

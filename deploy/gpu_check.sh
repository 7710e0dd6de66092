#!/bin/bash
# One prepared GPU check of mlaan-pipe, about 8 minutes on one GPU, for machines that have a
# GPU and PyTorch 2.11 (CUDA 13) but no Rust toolchain and no network (cluster compute nodes,
# short-lived cloud machines).
#
# Two steps:
#   deploy/gpu_check.sh --pack [DIR]     here, with cargo: build the release binary and the test
#                                        binaries that hold CUDA tests, strip them and put them
#                                        in DIR (default target/gpu-pack) with a manifest; fails
#                                        when the pack is over 60 MiB
#   deploy/gpu_check.sh [--pack-dir DIR] there: run the check against that machine's own
#                                        torch/lib (its version must be 2.11.x)
#
# The check, one row each in a table printed at the end and written to OUT/gpu_check.md:
#   doctor            what the machine offers; fails when libtorch sees no GPU
#   cuda tests        every CUDA-only test (`cuda_*`) of the packed test binaries, with
#                     MLAAN_REQUIRE_CUDA=1 so that a test cannot pass by skipping; the stage
#                     equalities (sync on 2 and 4 stages of one GPU = sequential; sync across
#                     two GPUs = sequential, when there are two) are rows of their own
#   train fp32/bf16   `train --gpus 0` of the make-run model (ResNet-8 K=3 MLAAN, async over two
#                     stages on the one GPU) for 300 steps on Fashion-MNIST-shaped data
#   gloo replicas     two data-parallel replicas on the one GPU (`launch`, Gloo)
#   nccl              NCCL all-reduces to Gloo's values (a CUDA test); a one-replica run whose
#                     modules reduce with NCCL; NCCL's bandwidth beside Gloo through host memory
#                     for 64 KiB-64 MiB buffers (`cargo bench --bench allreduce`, packed); with
#                     two GPUs, 2 ranks x 1 stage with NCCL = 1 process with 2 micro-batches,
#                     and a killed rank ends the other within the timeout (tests/distributed.rs
#                     under MLAAN_TEST_NCCL=1)
#   gpu bench         deploy/gpu_bench.sh's compute set, one repeat
#
# With --devices cpu the same runs use CPU stand-ins (no strict switch: the CUDA tests then
# skip, and say so), which checks the script end to end on a machine without a GPU.
#
# Exit code: 0 when every row passed or was skipped for want of a second GPU, 1 otherwise,
# 2 on bad usage.
set -euo pipefail

usage() {
    sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

options:
  --pack [DIR]       build and pack (see above)
  --pack-dir DIR     the pack to run (default target/gpu-pack)
  --torch DIR        the torch directory to run against (default: python3's torch)
  --out DIR          results (default runs/gpu-check-<host>-<date>)
  --devices cpu      CPU stand-ins instead of GPU 0
  --steps N          training steps of each train row (default 300)
  -h, --help         this text
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAX_PACK_MIB=60
PACK_DIR="" DO_PACK=0 TORCH="" OUT="" DEVICES="" STEPS=300
while (($#)); do
    case $1 in
    --pack)
        DO_PACK=1
        if [[ ${2:-} != "" && ${2:0:1} != - ]]; then
            PACK_DIR=$2
            shift
        fi
        shift
        ;;
    --pack-dir) PACK_DIR=${2:?--pack-dir needs a value}; shift 2 ;;
    --torch) TORCH=${2:?--torch needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --devices) DEVICES=${2:?--devices needs a value}; shift 2 ;;
    --steps) STEPS=${2:?--steps needs a value}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $STEPS =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --steps '$STEPS' is not a number" >&2; exit 2; }
[[ -z $DEVICES || $DEVICES == cpu ]] || { echo "gpu_check.sh: --devices takes only cpu" >&2; exit 2; }
PACK_DIR=${PACK_DIR:-$ROOT/target/gpu-pack}

log() { printf '[%s gpu_check] %s\n' "$(date '+%H:%M:%S')" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# --pack: the binaries, stripped, with what the check needs to find them
# ---------------------------------------------------------------------------------------------
if ((DO_PACK)); then
    command -v cargo >/dev/null || { log "--pack needs cargo (run it where the project builds)"; exit 2; }
    cd "$ROOT"
    log "building the release binary and the test binaries"
    cargo build --release
    # Every test executable, with the source file of its target: the ones whose crate sources
    # hold a CUDA-only test (`cuda_for_test` / `cuda_devices_for_test`) are packed.
    artifacts=$(mktemp)
    trap 'rm -f "$artifacts"' EXIT
    cargo test --release --workspace --no-run --message-format=json-render-diagnostics >"$artifacts"
    mapfile -t tests < <(python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test"):
        print(m["executable"] + "\t" + m["target"]["src_path"] + "\t" + m["target"]["name"])
' <"$artifacts")
    rm -rf "$PACK_DIR"
    mkdir -p "$PACK_DIR/tests"
    cp target/release/mlaan-pipe "$PACK_DIR/"
    strip "$PACK_DIR/mlaan-pipe"
    : >"$PACK_DIR/tests.txt"
    for t in "${tests[@]}"; do
        IFS=$'\t' read -r exe src name <<<"$t"
        # A library's unit tests live anywhere under its src/; an integration test is one file
        # plus what it includes from its directory.
        if [[ $src == */src/lib.rs ]]; then scope=$(dirname "$src"); else scope=$src; fi
        if grep -rqE 'cuda_for_test|cuda_devices_for_test|MLAAN_TEST_NCCL' "$scope"; then
            crate=$(basename "$(dirname "$(dirname "$src")")")
            [[ $src == "$ROOT/src/"* || $src == "$ROOT/tests/"* ]] && crate=mlaan-pipe
            packed="$crate--$name"
            cp "$exe" "$PACK_DIR/tests/$packed"
            strip "$PACK_DIR/tests/$packed"
            echo "$packed" >>"$PACK_DIR/tests.txt"
        fi
    done
    # The all-reduce benchmark (NCCL against Gloo through host memory).
    cargo bench --bench allreduce --no-run --message-format=json-render-diagnostics >"$artifacts"
    bench=$(python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "allreduce":
        print(m["executable"])
' <"$artifacts")
    cp "$bench" "$PACK_DIR/allreduce-bench"
    strip "$PACK_DIR/allreduce-bench"
    cp deploy/gpu_check.sh deploy/gpu_bench.sh "$PACK_DIR/"
    cp -r configs "$PACK_DIR/"
    {
        echo "torch_series=2.11"
        echo "built=$(date -Is)"
        echo "git=$(git describe --always --dirty 2>/dev/null || echo unknown)"
    } >"$PACK_DIR/manifest.txt"
    size=$(du -sm "$PACK_DIR" | cut -f1)
    log "packed $(wc -l <"$PACK_DIR/tests.txt") test binaries and mlaan-pipe into $PACK_DIR (${size} MiB)"
    if ((size > MAX_PACK_MIB)); then
        log "the pack is ${size} MiB, over the ${MAX_PACK_MIB} MiB a GPU machine is sent"
        exit 1
    fi
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------
[[ -x $PACK_DIR/mlaan-pipe && -f $PACK_DIR/tests.txt ]] ||
    { log "no pack in $PACK_DIR: make one with 'deploy/gpu_check.sh --pack' where cargo is"; exit 2; }
PACK_DIR=$(cd "$PACK_DIR" && pwd)
BIN=$PACK_DIR/mlaan-pipe

# The machine's own torch, version-checked against the pack's.
if [[ -z $TORCH ]]; then
    TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null) ||
        { log "no torch importable by python3: give its directory with --torch"; exit 2; }
fi
want=$(sed -n 's/^torch_series=//p' "$PACK_DIR/manifest.txt")
have=$(sed -n "s/^__version__ *= *['\"]\([0-9]*\.[0-9]*\).*/\1/p" "$TORCH/version.py" 2>/dev/null | head -1)
if [[ $have != "$want" ]]; then
    log "torch at $TORCH is ${have:-of unknown version}; the pack was built for torch $want.x"
    exit 2
fi
export LD_LIBRARY_PATH=$TORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NO_COLOR=1 MLAAN_LOG=${MLAAN_LOG:-info}

if [[ -z $OUT ]]; then
    OUT=runs/gpu-check-$(hostname -s 2>/dev/null || echo host)-$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$OUT"
log "pack $PACK_DIR, torch $TORCH, results in $OUT"

if [[ $DEVICES == cpu ]]; then
    one=(--devices cpu) two=(--devices cpu,cpu) strict=0
else
    one=(--gpus 0) two=(--gpus 0,0) strict=1
fi
ROWS=()
failed=0
# row NAME STATUS SECONDS DETAIL
row() {
    ROWS+=("| $1 | $2 | $3 | $4 |")
    [[ $2 == PASS || $2 == SKIP* ]] || failed=$((failed + 1))
    log "$1: $2 ($3 s) $4"
}
# check NAME LOGFILE COMMAND...: a row from the command's exit status.
check() {
    local name=$1 logf=$2 start=$SECONDS rc=0
    shift 2
    echo "\$ $*" >"$logf"
    "$@" >>"$logf" 2>&1 || rc=$?
    CHECK_SECONDS=$((SECONDS - start))
    CHECK_RC=$rc
    if ((rc == 0)); then
        row "$name" PASS "$CHECK_SECONDS" "${CHECK_DETAIL:-}"
    else
        local why
        why=$(grep -m1 -E '^error|panicked' "$logf" || tail -n 2 "$logf")
        row "$name" "FAIL (exit $rc)" "$CHECK_SECONDS" "$(echo "$why" | tr '\n|' ' /' | cut -c1-200)"
    fi
    CHECK_DETAIL=""
}

# 1. doctor
CHECK_DETAIL=$("$BIN" doctor 2>/dev/null | sed -n 's/^verdict *//p' | tr '|' '/' || true)
if [[ $DEVICES == cpu ]]; then
    check doctor doctor.log "$BIN" doctor
else
    check doctor doctor.log bash -c "'$BIN' doctor && '$BIN' doctor --json | grep -q '\"libtorch_cuda_devices\": [1-9]'"
fi
gpus=$("$BIN" doctor --json 2>/dev/null | sed -n 's/.*"libtorch_cuda_devices": \([0-9]*\).*/\1/p' || echo 0)

# 2. CUDA tests, strict; the stage equalities as rows of their own
export MLAAN_REQUIRE_CUDA=$strict
run_tests() { # NAME FILTER [libtest options...]
    local name=$1 filter=$2 t logf start=$SECONDS rc=0 ran=0 skipped=0
    shift 2
    logf=tests-$(echo "$name" | tr -c 'a-zA-Z0-9\n' '-').log
    : >"$logf"
    while read -r t; do
        "$PACK_DIR/tests/$t" "$filter" "$@" --test-threads 1 --nocapture >>"$logf" 2>&1 || rc=1
    done <"$PACK_DIR/tests.txt"
    ran=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed.*/\1/p' "$logf" | awk '{n += $1} END {print n + 0}')
    skipped=$(grep -c 'skipped: ' "$logf" || true)
    if ((rc != 0)); then
        row "$name" FAIL $((SECONDS - start)) "$(grep -E '^test .*FAILED|panicked' "$logf" | head -n 2 | tr '\n|' ' /' | cut -c1-160)"
    elif ((ran == 0)); then
        row "$name" "FAIL (no test ran)" $((SECONDS - start)) "filter $filter"
    elif ((skipped > 0)); then
        row "$name" "SKIP ($skipped of $ran)" $((SECONDS - start)) "$(grep -o -m1 'skipped: .*' "$logf" | tr '|' '/' | cut -c1-160)"
    else
        row "$name" PASS $((SECONDS - start)) "$ran test(s)"
    fi
}
run_tests "sync = sequential, 2 and 4 stages on one GPU" cuda_sync_on_stages_sharing_one_gpu_equals_sequential
run_tests "sync = sequential, --gpus 0,1" cuda_sync_across_two_gpus_equals_sequential
run_tests "every other CUDA test" cuda_ --skip cuda_sync_
unset MLAAN_REQUIRE_CUDA

# 3. the make-run model on the GPU, fp32 and bf16 (Fashion-MNIST-shaped synthetic data: no
# files needed; 300 steps of 128)
train_common=(train --config "$PACK_DIR/configs/default.toml" --dataset synthetic
    --set data.synthetic_size=28 --set data.synthetic_channels=1 --set data.synthetic_classes=10
    --set "data.synthetic_samples=$((STEPS * 128))" --set data.workers=4 --epochs 1)
for precision in fp32 bf16; do
    run_dir=$OUT/train-$precision
    check "train ${two[*]} $precision, $STEPS steps" "train-$precision.log" \
        "$BIN" "${train_common[@]}" "${two[@]}" --set "train.precision=\"$precision\"" --out "$run_dir"
    if ((CHECK_RC == 0)); then
        line=$(grep -o 'test accuracy [0-9.]* .*images/s' "train-$precision.log" | tail -1 || true)
        ROWS[-1]="| train ${two[*]} $precision, $STEPS steps | PASS | $CHECK_SECONDS | ${line:-see log} |"
    fi
done

# 4. two Gloo replicas on the one GPU (each takes its slice of --gpus 0,0)
check "gloo replicas, 2 processes on ${two[*]}" gloo.log "$BIN" launch --nproc-per-node 2 -- \
    train --dataset synthetic --arch resnet8 --k 2 --method dgl --schedule sync "${two[@]}" \
    --batch-size 64 --max-steps 40 --set data.synthetic_size=28 --set data.synthetic_channels=1 \
    --set data.synthetic_samples=8192 --set data.workers=2 --out "$OUT/gloo"

# 5. NCCL: its all-reduce against Gloo's, a run whose groups reduce with it, its bandwidth
# against Gloo through host memory, and (two GPUs) the replica equality and a killed rank.
if [[ $DEVICES == cpu ]]; then
    row "nccl" "SKIP (CPU stand-ins)" 0 "NCCL reduces GPU memory"
else
    export MLAAN_REQUIRE_CUDA=1
    run_tests "NCCL all-reduce = Gloo" cuda_nccl_all_reduce_equals_gloo
    unset MLAAN_REQUIRE_CUDA
    check "nccl, 1 replica, --gpus 0" nccl-train.log "$BIN" launch --nproc-per-node 1 -- \
        train --dataset synthetic --arch resnet8 --k 3 --method mlaan-dgl --schedule sync \
        --gpus 0 --batch-size 128 --max-steps 100 --set data.synthetic_size=28 \
        --set data.synthetic_channels=1 --set data.synthetic_samples=12800 \
        --set 'distributed.backend="nccl"' --out "$OUT/nccl-train"
    if ((CHECK_RC == 0)) && ! grep -q '"nccl"' "$OUT/nccl-train/summary.json"; then
        ROWS[-1]="| nccl, 1 replica, --gpus 0 | FAIL | $CHECK_SECONDS | summary.json names no NCCL group |"
        failed=$((failed + 1))
    fi
    check "all-reduce bandwidth, NCCL and Gloo through host" allreduce.log "$PACK_DIR/allreduce-bench"
    if ((CHECK_RC == 0)); then
        ratio=$(grep -A8 'NCCL / Gloo' allreduce.log | grep '65536 KiB' | tr -d ' ' | cut -d'|' -f3)
        ROWS[-1]="| all-reduce bandwidth, NCCL and Gloo through host | PASS | $CHECK_SECONDS | 64 MiB: NCCL takes ${ratio:-?}× Gloo-through-host's time (allreduce.log) |"
    fi
    if ((gpus >= 2)); then
        export MLAAN_PIPE=$BIN MLAAN_TEST_NCCL=1
        run_tests "NCCL: 2 ranks x 1 stage = 1 process, 2 micro-batches" two_replicas_equal_one_process_accumulating_two_micro_batches --exact
        run_tests "NCCL: a killed rank ends the other" a_killed_rank_ends_the_other_promptly_naming_it --exact
        unset MLAAN_PIPE MLAAN_TEST_NCCL
    else
        row "NCCL across two GPUs" "SKIP (needs 2 GPUs)" 0 "$gpus GPU(s) here"
    fi
fi

# 6. the gpu_bench compute set, one repeat
bench_args=(--bin "$BIN" --out "$OUT/bench" --repeats 1 --steps 15 --warmup 5)
[[ $DEVICES == cpu ]] && bench_args+=(--devices cpu --steps 2 --warmup 1 --batch-size 32 --imagenet-batch-size 4)
check "gpu_bench compute set" bench.log bash "$PACK_DIR/gpu_bench.sh" "${bench_args[@]}"

# The table
{
    echo "# mlaan-pipe GPU check"
    echo
    echo "$(date -Is), $(hostname 2>/dev/null || echo '?'), torch $TORCH, $gpus GPU(s) visible to libtorch"
    echo
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo '```'
        nvidia-smi -L 2>/dev/null || true
        echo '```'
        echo
    fi
    echo "| check | result | s | detail |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
    if [[ -f $OUT/bench/README.md ]]; then
        echo
        sed 's/^#/##/' "$OUT/bench/README.md"
    fi
} >"$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
log "done: ${#ROWS[@]} checks, $failed failed; $OUT/gpu_check.md"
((failed == 0))

#!/bin/bash
# The standard GPU benchmark set of mlaan-pipe: `mlaan-pipe bench` (e2e, GPipe, DGL, InfoPro,
# MLAAN async and sync, side by side) for
#   ResNet-32 and ResNet-110, CIFAR-shaped synthetic data (3x32x32, 10 classes), batch 1024, K=4:
#     all four stages on one GPU (--gpus 0,0,0,0), then across GPUs (--gpus 0,1,2,3 with four or
#     more GPUs, --gpus 0,0,1,1 with two or three);
#   with --imagenet also ResNet-34 at 3x224x224 (1000 classes), batch 128, K=4, the same two ways.
# Synthetic data: no dataset files, no network. Results go to one directory:
#   OUT/system/        nvidia-smi -L, nvidia-smi, topology, GPU query (CSV), host and build facts
#   OUT/<run>/         bench.json, bench.md, plots (PNG) and bench.log of each benchmark
#   OUT/commands.txt   every command run;  OUT/status.tsv  run, exit code, seconds
#   OUT/README.md      every run's bench.md, one after another
# Exit code 0 when every benchmark ran, 1 when one failed (the others still run), 2 on bad usage.
#
#   deploy/gpu_bench.sh --out runs/gpu-bench                 # on a GPU node
#   deploy/gpu_bench.sh --imagenet --repeats 5
#   sbatch deploy/slurm/bench.sbatch --imagenet              # the same through SLURM
#   deploy/gpu_bench.sh --devices cpu,cpu,cpu,cpu --quick --batch-size 64   # smoke test on CPU
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/gpu_bench.sh [options]
  --out DIR          results directory (default runs/gpu-bench-<host>-<date>)
  --bin PATH         mlaan-pipe binary (default $MLAAN_PIPE or ./target/release/mlaan-pipe)
  --imagenet         also ResNet-34 at 224x224, batch 128
  --steps N          timed batches per measurement (default 30; ImageNet 20)
  --warmup N         untimed batches before each measurement (default 10; ImageNet 5)
  --repeats N        repetitions of every case (default 3)
  --quick            --steps 5 --warmup 2 --repeats 1 (checks that everything runs)
  --cases LIST       bench cases (default: all of `mlaan-pipe bench --help`)
  --batch-size N     CIFAR batch size (default 1024)
  --imagenet-batch-size N   ImageNet batch size (default 128)
  --gpus N           use N GPUs (default: counted from CUDA_VISIBLE_DEVICES or nvidia-smi -L)
  --devices LIST     run every benchmark on this --devices list instead (e.g. cpu,cpu,cpu,cpu)
  --dry-run          print the commands, run nothing
  -h, --help         this text
EOF
}

OUT="" BIN=${MLAAN_PIPE:-./target/release/mlaan-pipe} IMAGENET=0 STEPS="" WARMUP="" REPEATS=3
CASES="" BATCH=1024 IMAGENET_BATCH=128 NGPUS="" DEVICES_OVERRIDE="" DRY_RUN=0
while (($#)); do
    case $1 in
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --bin) BIN=${2:?--bin needs a value}; shift 2 ;;
    --imagenet) IMAGENET=1; shift ;;
    --steps) STEPS=${2:?--steps needs a value}; shift 2 ;;
    --warmup) WARMUP=${2:?--warmup needs a value}; shift 2 ;;
    --repeats) REPEATS=${2:?--repeats needs a value}; shift 2 ;;
    --quick) STEPS=5 WARMUP=2 REPEATS=1; shift ;;
    --cases) CASES=${2:?--cases needs a value}; shift 2 ;;
    --batch-size) BATCH=${2:?--batch-size needs a value}; shift 2 ;;
    --imagenet-batch-size) IMAGENET_BATCH=${2:?--imagenet-batch-size needs a value}; shift 2 ;;
    --gpus) NGPUS=${2:?--gpus needs a value}; shift 2 ;;
    --devices) DEVICES_OVERRIDE=${2:?--devices needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_bench.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
for v in "$REPEATS" "$BATCH" "$IMAGENET_BATCH" ${STEPS:+"$STEPS"} ${WARMUP:+"$WARMUP"} ${NGPUS:+"$NGPUS"}; do
    if [[ ! $v =~ ^[0-9]+$ ]]; then
        echo "gpu_bench.sh: '$v' is not a number" >&2
        exit 2
    fi
done

log() { printf '[%s gpu_bench] %s\n' "$(date '+%H:%M:%S')" "$*" >&2; }

# GPUs visible to this process, as CUDA_VISIBLE_DEVICES (set by SLURM) or nvidia-smi sees them.
count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        local cvd=${CUDA_VISIBLE_DEVICES// /} ids
        if [[ -z $cvd || $cvd == NoDevFiles || $cvd == -1 ]]; then
            echo 0
            return
        fi
        IFS=, read -r -a ids <<<"$cvd"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

if [[ -z $NGPUS ]]; then
    NGPUS=$(count_gpus)
fi
if [[ -z $DEVICES_OVERRIDE ]] && ((NGPUS == 0)) && ((DRY_RUN == 0)); then
    log "no GPU visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}); use --gpus N," \
        "or --devices cpu,... for a CPU smoke test"
    exit 2
fi
if ((DRY_RUN == 0)) && [[ ! -x $BIN ]]; then
    log "mlaan-pipe binary $BIN not found: build it with 'make build' (docs/setup.md), or --bin"
    exit 2
fi
if [[ -z $OUT ]]; then
    OUT=runs/gpu-bench-$(hostname -s 2>/dev/null || echo host)-$(date +%Y%m%d-%H%M%S)
fi

# The runs: name, then the arguments of `mlaan-pipe bench` after the common ones.
RUNS=()
add_runs() { # NAME_PREFIX ARGS... : one run per device layout
    local prefix=$1
    shift
    if [[ -n $DEVICES_OVERRIDE ]]; then
        RUNS+=("$prefix-devices|--devices $DEVICES_OVERRIDE $*")
        return
    fi
    RUNS+=("$prefix-1gpu|--gpus 0,0,0,0 $*")
    if ((NGPUS >= 4)); then
        RUNS+=("$prefix-4gpu|--gpus 0,1,2,3 $*")
    elif ((NGPUS >= 2)); then
        RUNS+=("$prefix-2gpu|--gpus 0,0,1,1 $*")
    fi
}
cifar_timing=(--steps "${STEPS:-30}" --warmup "${WARMUP:-10}" --repeats "$REPEATS")
imagenet_timing=(--steps "${STEPS:-20}" --warmup "${WARMUP:-5}" --repeats "$REPEATS")
for arch in resnet32 resnet110; do
    add_runs "$arch-k4" --arch "$arch" --k 4 --batch-size "$BATCH" "${cifar_timing[@]}"
done
# mlaan-infopro is left out at 224 unless --cases names it: its cascade decoder upsamples the
# 512-channel LAM output to 224x224 before its first conv (128x512x224x224 elements, more than
# 2^31 at batch 128), and CUDA's bilinear-upsampling backward fails with "invalid argument"
# (seen on an H200); a failing case aborts the whole `bench` call.
imagenet_cases=()
if [[ -z $CASES ]]; then
    imagenet_cases=(--cases "e2e,gpipe,dgl,infopro,mlaan-dgl,mlaan-dgl:sync")
fi
if ((IMAGENET)); then
    # ImageNet-shaped synthetic data; 4 batches bound what the bench holds in memory.
    add_runs resnet34-k4-224 --arch resnet34 --k 4 --batch-size "$IMAGENET_BATCH" \
        --dataset synthetic --set data.synthetic_size=224 --set data.synthetic_classes=1000 \
        --set data.synthetic_samples=$((IMAGENET_BATCH * 4)) "${imagenet_timing[@]}" \
        ${imagenet_cases[@]+"${imagenet_cases[@]}"}
fi

if ((DRY_RUN)); then
    for r in "${RUNS[@]}"; do
        echo "$BIN bench ${r#*|}${CASES:+ --cases $CASES} --out $OUT/${r%%|*}"
    done
    exit 0
fi

mkdir -p "$OUT/system"
OUT=$(cd "$OUT" && pwd)
log "results in $OUT; $NGPUS GPU(s); ${#RUNS[@]} benchmark(s)"

# What the numbers were measured on.
{
    echo "date: $(date -Is)"
    echo "host: $(hostname 2>/dev/null || echo '?')"
    echo "kernel: $(uname -srm)"
    echo "cpus: $(nproc 2>/dev/null || echo '?')"
    echo "CUDA_VISIBLE_DEVICES: ${CUDA_VISIBLE_DEVICES-unset}"
    env | grep -E '^SLURM_(JOB_ID|JOB_NAME|JOB_NODELIST|CPUS_PER_TASK|GPUS_ON_NODE|JOB_PARTITION)=' | sort || true
    echo "binary: $BIN"
    echo "version: $("$BIN" --version 2>&1 || echo '?')"
    if git rev-parse --git-dir >/dev/null 2>&1; then
        echo "git: $(git describe --always --dirty 2>/dev/null || echo '?')"
    fi
    if command -v lscpu >/dev/null 2>&1; then
        lscpu | grep -E '^(Model name|Socket|Core|Thread|NUMA node\(s\))' || true
    fi
    if command -v free >/dev/null 2>&1; then
        free -g | head -n 2
    fi
} >"$OUT/system/host.txt" 2>&1
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L >"$OUT/system/nvidia-smi-L.txt" 2>&1 || true
    nvidia-smi >"$OUT/system/nvidia-smi.txt" 2>&1 || true
    nvidia-smi topo -m >"$OUT/system/nvidia-smi-topo.txt" 2>&1 || true
    nvidia-smi --query-gpu=index,name,uuid,pci.bus_id,driver_version,memory.total,power.limit,clocks.max.sm,persistence_mode \
        --format=csv >"$OUT/system/gpus.csv" 2>&1 || true
else
    echo "nvidia-smi not found" >"$OUT/system/nvidia-smi-L.txt"
fi

: >"$OUT/commands.txt"
printf 'run\texit\tseconds\n' >"$OUT/status.tsv"
failed=0
for r in "${RUNS[@]}"; do
    name=${r%%|*}
    read -r -a args <<<"${r#*|}"
    if [[ -n $CASES ]]; then
        args+=(--cases "$CASES")
    fi
    mkdir -p "$OUT/$name"
    cmd=("$BIN" bench "${args[@]}" --out "$OUT/$name")
    echo "${cmd[*]}" >>"$OUT/commands.txt"
    log "$name: ${cmd[*]}"
    start=$SECONDS
    rc=0
    "${cmd[@]}" >"$OUT/$name/bench.log" 2>&1 || rc=$?
    printf '%s\t%d\t%d\n' "$name" "$rc" $((SECONDS - start)) >>"$OUT/status.tsv"
    if ((rc != 0)); then
        failed=$((failed + 1))
        log "$name failed (exit $rc); last lines of $OUT/$name/bench.log:"
        tail -n 5 "$OUT/$name/bench.log" >&2 || true
    fi
done

{
    echo "# mlaan-pipe GPU benchmarks"
    echo
    echo "$(date -Is), $(hostname 2>/dev/null || echo '?'), $NGPUS GPU(s):"
    echo
    echo '```'
    cat "$OUT/system/nvidia-smi-L.txt" 2>/dev/null || true
    echo '```'
    for r in "${RUNS[@]}"; do
        name=${r%%|*}
        echo
        echo "## $name"
        echo
        echo "\`$(grep -F -- "--out $OUT/$name" "$OUT/commands.txt" | head -1)\`"
        echo
        if [[ -f $OUT/$name/bench.md ]]; then
            cat "$OUT/$name/bench.md"
        else
            echo "failed: see $name/bench.log"
        fi
    done
} >"$OUT/README.md"

log "done: ${#RUNS[@]} benchmark(s), $failed failed; summary in $OUT/README.md"
((failed == 0))

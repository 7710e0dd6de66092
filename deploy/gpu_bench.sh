#!/bin/bash
# The GPU benchmarks of mlaan-pipe, each a `mlaan-pipe bench` run (cases side by side, repeated
# and interleaved, on CIFAR- or ImageNet-shaped synthetic data: no dataset files, no network).
#
# Default, the compute set (about 8 minutes of one H200): all four stages of K = 4 on one GPU
# (--gpus 0,0,0,0), channels-last, cuDNN benchmark and TF32 on:
#   ResNet-32, 3x32x32, batch 1024: e2e in fp32 and bf16; dgl, mlaan-dgl async and mlaan-dgl
#     sync, each in fp32 and bf16, each on the default stream and with a stream per stage;
#   ResNet-34, 3x224x224, 1000 classes, batch 128: e2e and mlaan-dgl (async) in bf16;
#   ViT-S/16, 3x224x224, 1000 classes, batch 128: e2e, dgl and mlaan-dgl (async) in bf16
#     (contiguous: a ViT's activations are token sequences, channels-last does not apply).
# A case is compared with the e2e of its own precision (`× e2e`); the tables carry images/s,
# stage shares and the caching allocator's peak per GPU.
#
# --full adds the standard set: e2e, GPipe, DGL, InfoPro, MLAAN async and sync for ResNet-32
# and ResNet-110 at batch 1024, on one GPU and across GPUs (--gpus 0,1,2,3 with four or more,
# --gpus 0,0,1,1 with two or three); with --imagenet also ResNet-34 at 224, batch 128.
#
# Results go to one directory:
#   OUT/system/        nvidia-smi -L, nvidia-smi, topology, GPU query (CSV), host and build facts
#   OUT/<run>/         bench.json, bench.md, plots (PNG) and bench.log of each benchmark
#   OUT/commands.txt   every command run;  OUT/status.tsv  run, exit code, seconds
#   OUT/README.md      every run's bench.md, one after another (also printed at the end)
# Exit code 0 when every benchmark ran, 1 when one failed (the others still run), 2 on bad usage.
#
#   deploy/gpu_bench.sh --out runs/gpu-bench                 # on a GPU node
#   deploy/gpu_bench.sh --full --imagenet --repeats 5
#   sbatch deploy/slurm/bench.sbatch                         # the same through SLURM
#   deploy/gpu_bench.sh --devices cpu --quick --batch-size 32 --imagenet-batch-size 4  # on CPU
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/gpu_bench.sh [options]
  --out DIR          results directory (default runs/gpu-bench-<host>-<date>)
  --bin PATH         mlaan-pipe binary (default $MLAAN_PIPE or ./target/release/mlaan-pipe)
  --full             also the standard set (all methods, ResNet-32 and -110, GPU layouts)
  --imagenet         with --full: also ResNet-34 at 224x224 for every method
  --steps N          timed batches per measurement (default 30; ImageNet 20)
  --warmup N         untimed batches before each measurement (default 10; ImageNet 5)
  --repeats N        repetitions of every case (default 3)
  --quick            --steps 5 --warmup 2 --repeats 1 (checks that everything runs)
  --cases LIST       bench cases of the --full runs (default: all of `mlaan-pipe bench --help`)
  --batch-size N     CIFAR batch size (default 1024)
  --imagenet-batch-size N   ImageNet batch size (default 128)
  --gpus N           use N GPUs (default: counted from CUDA_VISIBLE_DEVICES or nvidia-smi -L)
  --devices LIST     run every benchmark on this --devices list instead (e.g. cpu: one
                     device stands for the GPU, all four stages on it)
  --dry-run          print the commands, run nothing
  -h, --help         this text
EOF
}

OUT="" BIN=${MLAAN_PIPE:-./target/release/mlaan-pipe} IMAGENET=0 FULL=0 STEPS="" WARMUP="" REPEATS=3
CASES="" BATCH=1024 IMAGENET_BATCH=128 NGPUS="" DEVICES_OVERRIDE="" DRY_RUN=0
while (($#)); do
    case $1 in
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --bin) BIN=${2:?--bin needs a value}; shift 2 ;;
    --imagenet) IMAGENET=1; shift ;;
    --full) FULL=1; shift ;;
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
# One device given for the GPU stands for it: all four stages on it, as --gpus 0,0,0,0.
one_device() {
    if [[ -n $DEVICES_OVERRIDE && $DEVICES_OVERRIDE != *,* ]]; then
        echo "--devices $DEVICES_OVERRIDE,$DEVICES_OVERRIDE,$DEVICES_OVERRIDE,$DEVICES_OVERRIDE"
    elif [[ -n $DEVICES_OVERRIDE ]]; then
        echo "--devices $DEVICES_OVERRIDE"
    else
        echo "--gpus 0,0,0,0"
    fi
}
add_runs() { # NAME_PREFIX ARGS... : one run per device layout
    local prefix=$1
    shift
    if [[ -n $DEVICES_OVERRIDE ]]; then
        RUNS+=("$prefix-devices|$(one_device) $*")
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
# ImageNet-shaped synthetic data; 4 batches bound what the bench holds in memory.
imagenet_data=(--dataset synthetic --set data.synthetic_size=224 --set data.synthetic_classes=1000
    --set "data.synthetic_samples=$((IMAGENET_BATCH * 4))")

# The compute set: precision x streams, side by side in one bench call.
compute_cases=e2e+fp32,e2e+bf16
for p in fp32 bf16; do
    for st in default-stream stream-per-stage; do
        compute_cases+=",dgl+$p+$st,mlaan-dgl+$p+$st,mlaan-dgl:sync+$p+$st"
    done
done
RUNS+=("resnet32-k4-compute|$(one_device) --arch resnet32 --k 4 --batch-size $BATCH \
--set train.memory_format=channels-last ${cifar_timing[*]} --cases $compute_cases")
RUNS+=("resnet34-k4-224-bf16|$(one_device) --arch resnet34 --k 4 --batch-size $IMAGENET_BATCH \
${imagenet_data[*]} --set train.memory_format=channels-last ${imagenet_timing[*]} \
--cases e2e+bf16,mlaan-dgl+bf16")
RUNS+=("vit-small-k4-224-bf16|$(one_device) --arch vit-small --k 4 --batch-size $IMAGENET_BATCH \
${imagenet_data[*]} ${imagenet_timing[*]} --cases e2e+bf16,dgl+bf16,mlaan-dgl+bf16")

if ((FULL)); then
    for arch in resnet32 resnet110; do
        add_runs "$arch-k4" --arch "$arch" --k 4 --batch-size "$BATCH" "${cifar_timing[@]}" \
            ${CASES:+--cases "$CASES"}
    done
    # mlaan-infopro is left out at 224 unless --cases names it: its cascade decoder upsamples
    # the 512-channel LAM output to 224x224 before its first conv (128x512x224x224 elements,
    # more than 2^31 at batch 128), and CUDA's bilinear-upsampling backward fails with
    # "invalid argument" (seen on an H200); a failing case aborts the whole `bench` call.
    if ((IMAGENET)); then
        add_runs resnet34-k4-224 --arch resnet34 --k 4 --batch-size "$IMAGENET_BATCH" \
            "${imagenet_data[@]}" "${imagenet_timing[@]}" \
            --cases "${CASES:-e2e,gpipe,dgl,infopro,mlaan-dgl,mlaan-dgl:sync}"
    fi
fi

if ((DRY_RUN)); then
    for r in "${RUNS[@]}"; do
        echo "$BIN bench ${r#*|} --out $OUT/${r%%|*}"
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

cat "$OUT/README.md"
log "done: ${#RUNS[@]} benchmark(s), $failed failed; summary in $OUT/README.md"
((failed == 0))

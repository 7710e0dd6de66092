# shellcheck shell=bash
# Shared logic of the SLURM batch scripts (single_node.sbatch, sweep_array.sbatch,
# bench.sbatch): sourced, never run. Everything here is a function; sourcing has no effect
# beyond defining them.
#
# The one that matters is `mlaan_run_trainer`: it runs the trainer in the background, forwards
# the signals SLURM sends the batch shell (USR1 ten minutes before the time limit with
# `--signal=B:USR1@600`, TERM on pre-emption or cancellation) to it, waits until it has really
# exited, and when it stopped with exit code 75 (drained, checkpoint written) requeues the job
# with `scontrol requeue`, so that the next start continues from the checkpoint through
# `--resume auto`.
#
# Environment read here (all optional):
#   MLAAN_PIPE     trainer binary (default ./target/release/mlaan-pipe, relative to the
#                  submit directory)
#   GPUS           GPU indices for --gpus, e.g. 0,0,1,1 (default: 0..N-1 for the N GPUs of the
#                  allocation, counted from CUDA_VISIBLE_DEVICES or SLURM_GPUS_ON_NODE)
#   DEVICES        --devices list instead of --gpus, e.g. cpu,cpu (tests, CPU-only nodes)
#   DATA_DIR       passed as --data-dir
#   EXTRA_ARGS     more trainer flags, split on whitespace, e.g. "--set optim.lr=0.4"
#   REQUEUE        1 (default): requeue after a checkpointed stop; 0: never requeue
#   MAX_REQUEUES   stop requeueing once SLURM_RESTART_COUNT reaches this (default 100)
#   MLAAN_SCONTROL scontrol command (default scontrol; tests put a stub here or on PATH)
#   MLAAN_TASKS    words put before the trainer to start one process per task, e.g.
#                  "srun --kill-on-bad-exit=1" (multi_node.sbatch); empty: the batch shell's
#                  own process is the one replica
# A file named NO_REQUEUE in the run directory also prevents the requeue: touch it, then
# `scancel --batch --signal=USR1 JOBID` stops a run cleanly at a checkpoint.

# Exit code of `mlaan-pipe train` stopped by a signal after writing its checkpoint (EX_TEMPFAIL).
MLAAN_EXIT_INTERRUPTED=75

mlaan_log() {
    printf '[%s %s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "${MLAAN_LOG_TAG:-mlaan}" "$*" >&2
}

# Print an absolute path: PATH as given when absolute, else relative to the submit directory.
mlaan_abspath() {
    local p=$1
    if [[ $p == /* ]]; then
        printf '%s\n' "$p"
    else
        printf '%s/%s\n' "${SLURM_SUBMIT_DIR:-$PWD}" "${p#./}"
    fi
}

# Number of GPUs this job may use: the entries of CUDA_VISIBLE_DEVICES when it is set (SLURM
# sets it to the allocated GPUs; empty means none), else SLURM_GPUS_ON_NODE, else what
# nvidia-smi lists, else 0.
mlaan_count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        local cvd=${CUDA_VISIBLE_DEVICES// /}
        if [[ -z $cvd || $cvd == NoDevFiles || $cvd == -1 ]]; then
            echo 0
            return
        fi
        local -a ids
        IFS=, read -r -a ids <<<"$cvd"
        echo "${#ids[@]}"
    elif [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# `0,1,...,N-1`: the trainer numbers GPUs as CUDA_VISIBLE_DEVICES does.
mlaan_gpu_list() {
    local n=$1 i list=""
    for ((i = 0; i < n; i++)); do
        list+="${list:+,}$i"
    done
    printf '%s\n' "$list"
}

# Fill the array MLAAN_DEVICE_ARGS with --devices/--gpus from DEVICES, GPUS or the allocation.
mlaan_device_args() {
    MLAAN_DEVICE_ARGS=()
    if [[ -n ${DEVICES:-} ]]; then
        MLAAN_DEVICE_ARGS=(--devices "$DEVICES")
    elif [[ -n ${GPUS:-} ]]; then
        MLAAN_DEVICE_ARGS=(--gpus "$GPUS")
    else
        local n
        n=$(mlaan_count_gpus)
        if ((n == 0)); then
            mlaan_log "no GPU visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}," \
                "SLURM_GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-unset}); request --gres=gpu:N," \
                "or set GPUS=... or DEVICES=cpu"
            return 2
        fi
        MLAAN_DEVICE_ARGS=(--gpus "$(mlaan_gpu_list "$n")")
    fi
}

# The trainer binary as an absolute path; fails with a hint when it is not there.
mlaan_binary() {
    local bin
    bin=$(mlaan_abspath "${MLAAN_PIPE:-./target/release/mlaan-pipe}")
    if [[ ! -x $bin ]]; then
        mlaan_log "trainer binary $bin not found or not executable: build it on the login" \
            "node with 'make build' (docs/setup.md: CUDA machines), or set MLAAN_PIPE"
        return 2
    fi
    printf '%s\n' "$bin"
}

# Job, node and GPU facts at the top of the log.
mlaan_print_job_info() {
    mlaan_log "host $(hostname 2>/dev/null || echo '?'), job ${SLURM_JOB_ID:-none}" \
        "(${SLURM_JOB_NAME:-no name}), array ${SLURM_ARRAY_JOB_ID:-none}_${SLURM_ARRAY_TASK_ID:-none}," \
        "restart ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-none}," \
        "cpus/task ${SLURM_CPUS_PER_TASK:-?}, gpus on node ${SLURM_GPUS_ON_NODE:-?}," \
        "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L >&2 2>/dev/null || mlaan_log "nvidia-smi -L failed"
    else
        mlaan_log "nvidia-smi not found"
    fi
}

# Should a run stopped at a checkpoint be requeued? Explains itself in the log when not.
mlaan_should_requeue() {
    local run_dir=$1
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        mlaan_log "not a SLURM job: no requeue; continue with the same command (--resume auto)"
        return 1
    fi
    if [[ ${REQUEUE:-1} != 1 ]]; then
        mlaan_log "REQUEUE=${REQUEUE}: no requeue"
        return 1
    fi
    if [[ -e $run_dir/NO_REQUEUE ]]; then
        mlaan_log "$run_dir/NO_REQUEUE exists: no requeue"
        return 1
    fi
    if ((${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-100})); then
        mlaan_log "already requeued ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=${MAX_REQUEUES:-100}): no requeue"
        return 1
    fi
    # `scancel` marks the job CANCELLED before its processes get TERM: then the stop was asked
    # for and requeueing would undo it. Pre-emption and the time limit leave it RUNNING.
    local info
    info=$("${MLAAN_SCONTROL:-scontrol}" show job -o "$SLURM_JOB_ID" 2>/dev/null || true)
    if [[ $info == *JobState=CANCELLED* ]]; then
        mlaan_log "job $SLURM_JOB_ID was cancelled: no requeue"
        return 1
    fi
    return 0
}

# Run "$@" (the trainer) in the background with USR1/TERM/INT forwarded to it; return its exit
# status, after requeueing the job when it stopped at a checkpoint (exit 75). Returns 0 when the
# job was requeued: SLURM then ends this attempt and starts the next one from the queue.
#
# Usage: mlaan_run_trainer RUN_DIR COMMAND [ARGS...]
mlaan_run_trainer() {
    local run_dir=$1
    shift
    MLAAN_SIGNALS=""
    MLAAN_CHILD=""
    # USR1 (time limit ahead) and TERM (pre-emption, cancel) go to the trainer as they are; it
    # treats both as "drain, checkpoint, exit 75". INT goes as TERM: a terminal's Ctrl-C also
    # reaches the trainer directly, and two INTs would make it exit at once without a checkpoint.
    trap 'mlaan_forward USR1 USR1' USR1
    trap 'mlaan_forward TERM TERM' TERM
    trap 'mlaan_forward INT TERM' INT
    "$@" &
    MLAAN_CHILD=$!
    if [[ -n $MLAAN_SIGNALS ]]; then
        # A signal came while the trainer was being started: pass it on now.
        kill -s TERM "$MLAAN_CHILD" 2>/dev/null || true
    fi
    mlaan_log "trainer started, pid $MLAAN_CHILD"

    local rc
    while :; do
        rc=0
        wait "$MLAAN_CHILD" || rc=$?
        # A trapped signal interrupts `wait` with 128+signal while the child runs on.
        if ((rc > 128)) && kill -0 "$MLAAN_CHILD" 2>/dev/null; then
            continue
        fi
        if ((rc > 128)); then
            # Either the child died of a signal or it exited while the trap ran: waiting again
            # returns its real status (bash keeps it), or 127 if bash already handed it out.
            local again=0
            wait "$MLAAN_CHILD" 2>/dev/null || again=$?
            if ((again != 127)); then
                rc=$again
            fi
        fi
        break
    done
    trap 'mlaan_log "got USR1 after the trainer exited: ignored"' USR1
    trap 'mlaan_log "got TERM after the trainer exited: ignored"' TERM
    trap - INT
    mlaan_log "trainer exited with code $rc${MLAAN_SIGNALS:+ (signals received:$MLAAN_SIGNALS)}"

    # A signal that arrives before the trainer has installed its handlers (the first second or
    # so) kills it: nothing was written after its last checkpoint, so that is a stop too.
    if [[ -n $MLAAN_SIGNALS ]] &&
        ((rc == 128 + $(kill -l USR1) || rc == 128 + $(kill -l TERM))); then
        mlaan_log "the trainer died of the forwarded signal before handling it; its last" \
            "checkpoint stands"
        rc=$MLAAN_EXIT_INTERRUPTED
    fi
    if ((rc == MLAAN_EXIT_INTERRUPTED)); then
        if mlaan_should_requeue "$run_dir"; then
            mlaan_log "checkpoint written; requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
            if "${MLAAN_SCONTROL:-scontrol}" requeue "$SLURM_JOB_ID"; then
                return 0
            fi
            mlaan_log "scontrol requeue $SLURM_JOB_ID failed; resubmit to continue from the checkpoint"
        fi
    fi
    return "$rc"
}

# Trap handler: note signal $1 and send $2 to the trainer.
mlaan_forward() {
    MLAAN_SIGNALS+=" $1"
    mlaan_log "got $1: asking the trainer (pid ${MLAAN_CHILD:-?}) to checkpoint and stop (SIG$2)"
    kill -s "$2" "${MLAAN_CHILD:-}" 2>/dev/null || true
}

# The whole training job: print facts, build the command, run it through mlaan_run_trainer.
# Exits the shell with the trainer's code (0 after a requeue).
#
# Usage: mlaan_train_job CONFIG RUN_DIR [TRAINER ARGS...]
mlaan_train_job() {
    local config=$1 run_dir=$2
    shift 2
    cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 2
    mlaan_print_job_info
    local bin
    bin=$(mlaan_binary) || exit 2
    config=$(mlaan_abspath "$config")
    if [[ ! -f $config ]]; then
        mlaan_log "config $config not found"
        exit 2
    fi
    run_dir=$(mlaan_abspath "$run_dir")
    mkdir -p "$run_dir" || exit 2
    mlaan_device_args || exit 2
    local -a extra=() cmd
    if [[ -n ${EXTRA_ARGS:-} ]]; then
        read -r -a extra <<<"$EXTRA_ARGS"
    fi
    local -a tasks=()
    if [[ -n ${MLAAN_TASKS:-} ]]; then
        read -r -a tasks <<<"$MLAAN_TASKS"
    fi
    cmd=(${tasks[@]+"${tasks[@]}"} "$bin" train --config "$config" --resume auto --out "$run_dir"
        "${MLAAN_DEVICE_ARGS[@]}")
    if [[ -n ${DATA_DIR:-} ]]; then
        cmd+=(--data-dir "$(mlaan_abspath "$DATA_DIR")")
    fi
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` in bash before 4.4
    cmd+=(${extra[@]+"${extra[@]}"} "$@")
    mlaan_log "run directory $run_dir"
    mlaan_log "command: ${cmd[*]}"
    local rc=0
    mlaan_run_trainer "$run_dir" "${cmd[@]}" || rc=$?
    mlaan_log "exit $rc"
    exit "$rc"
}

#!/bin/bash
# A real one-machine SLURM cluster (munged, slurmctld and slurmd on this host, everything under
# one directory, ports of its own), to try the batch scripts before a real cluster and for
# tests/slurm.rs. Needs Debian's slurmctld, slurmd, slurm-client and munge (`scripts/setup.sh
# --dev` installs them); run it as the user the jobs will run as (slurmd runs jobs as itself).
#
#   deploy/slurm/local_cluster.sh start DIR     # prints the SLURM_CONF line to export
#   export SLURM_CONF=DIR/slurm.conf
#   sbatch --nodes=1 --ntasks-per-node=2 --gres=none --cpus-per-task=1 --mem=1G ...
#   deploy/slurm/local_cluster.sh stop DIR
#
# The node offers this machine's cores (one task per core) and 4 GiB per core; there are no
# GPUs, so jobs ask for --gres=none and pass DEVICES=cpu,... to the scripts.

set -euo pipefail

die() {
    echo "local_cluster.sh: $*" >&2
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null 2>&1 ||
            PATH=$PATH:/usr/sbin command -v "$tool" >/dev/null 2>&1 ||
            die "$tool not found: install slurmctld slurmd slurm-client munge (scripts/setup.sh --dev)"
    done
    export PATH=$PATH:/usr/sbin
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ ! -e $dir/slurm.conf ]] || die "$dir already holds a cluster (stop it first)"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    # munged wants its directory private (and a socket directory others may enter).
    chmod 700 "$dir/munge"
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/seed" ||
        die "munged did not start; see $dir/log/munged.log"

    local host user cores
    host=$(hostname -s)
    user=$(id -un)
    cores=$(nproc)
    cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cores RealMemory=$((cores * 4096)) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -c -f "$SLURM_CONF" || die "slurmctld did not start; see $dir/log/slurmctld.log"
    slurmd -f "$SLURM_CONF" -N "$host" || die "slurmd did not start; see $dir/log/slurmd.log"
    local i
    for ((i = 0; i < 100; i++)); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    stop "$dir"
    die "the node did not become idle in 20 s; see $dir/log/"
}

# Stop the daemons this directory's pid files name (only those), then wait for them to go.
stop() {
    local dir=$1 pidfile pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || continue
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
}

case ${1:-} in
start) start "${2:?usage: local_cluster.sh start DIR}" ;;
stop) stop "${2:?usage: local_cluster.sh stop DIR}" ;;
*) die "usage: local_cluster.sh start|stop DIR" ;;
esac

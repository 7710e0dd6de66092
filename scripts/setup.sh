#!/usr/bin/env bash
# Installs what mlaan-pipe needs to build, test and run; called by `make setup|build|run|test`.
#
#   1. a project-local Python venv, .venv
#   2. the slim libtorch 2.11.0 from PyPI into it (torch without its CUDA dependencies, plus
#      the two CUDA runtime wheels that libtorch_cpu.so itself loads)
#   3. the symlink .libtorch -> .venv/lib/python3.X/site-packages/torch, which
#      .cargo/config.toml hands to torch-sys as LIBTORCH
#   3b. on a machine with an NVIDIA driver (or with CUDA=1), the CUDA libraries that torch's own
#      wheel metadata pins (its Requires-Dist: cuDNN, cuBLAS, NCCL, NVSHMEM, ...), so that
#      libtorch_cuda.so loads; without a driver nothing more is installed (CUDA=0 forces that)
#   4. Gloo's C++ headers from the Debian package libgloo-dev (mlaan-dist compiles c10d's
#      ProcessGroupGloo header against them; the wheel has c10d's headers but not Gloo's), and
#      libjpeg-turbo's headers and library from libjpeg62-turbo-dev (mlaan-data's JPEG decoder)
#   5. Fashion-MNIST from the Debian package dataset-fashion-mnist (for `make run`)
#   6. with --dev: TensorBoard into the venv, whose own reader the tests use on the event
#      files a run writes (and which serves them: .venv/bin/tensorboard --logdir runs), and
#      Debian's SLURM and munge, which tests/slurm.rs runs as a one-machine cluster
#      (deploy/slurm/local_cluster.sh) to submit the batch scripts to
#
# Each step checks first and does nothing when already done, so a second run takes well under
# a second and touches no network. See docs/setup.md.
#
# Usage: scripts/setup.sh [--data=required|optional|skip] [--dev] [--cuda-plan]
#   --data=required  fail when Fashion-MNIST is missing and cannot be installed (make run)
#   --data=optional  try to install it; only warn when that is impossible (default)
#   --data=skip      do not look at the data at all (make build)
#   --dev            also install TensorBoard and check that cargo fmt and cargo clippy are
#                    installed (make test)
#   --cuda-plan      only say whether step 3b would install torch's CUDA libraries, and which
#                    (one requirement per line on stdout); installs nothing
#
# Environment: CUDA=1 installs the CUDA libraries without looking for a driver, CUDA=0 never;
# MLAAN_GPU_PROBE=COMMAND replaces the driver probe (exit status 0: a driver is present).
#
# If LIBTORCH is set in the environment, that torch is used instead of .venv (steps 1-3 are
# skipped and only its version is checked), e.g. a GPU machine's full CUDA torch install.
set -euo pipefail

TORCH_VERSION=2.11.0
# Exact wheels; --no-deps keeps out the ~2 GB of CUDA libraries a CPU build never loads.
TORCH_PACKAGES=(
    "torch==${TORCH_VERSION}"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-cupti==13.0.85"
)
# TensorBoard and exactly its dependencies, installed with --no-deps like torch: pip then
# neither resolves anything at install time nor complains about torch's absent CUDA wheels.
TENSORBOARD_PACKAGES=(
    "tensorboard==2.21.0"
    "tensorboard-data-server==0.7.2"
    "absl-py==2.5.1"
    "grpcio==1.85.3"
    "markdown==3.11.3"
    "markupsafe==3.0.4"
    "numpy==2.4.6"
    "packaging==26.4"
    "pillow==13.0.0"
    "protobuf==7.36.2"
    "typing-extensions==4.16.0"
    "werkzeug==3.1.9"
)
GLOO_PACKAGE=libgloo-dev
GLOO_HEADER=/usr/include/gloo/config.h
JPEG_PACKAGE=libjpeg62-turbo-dev
JPEG_HEADER=/usr/include/jpeglib.h
SLURM_PACKAGES=(slurmctld slurmd slurm-client munge)
DATA_PACKAGE=dataset-fashion-mnist
DATA_DIR=/usr/share/datasets/fashion-mnist
DATA_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

data_mode=optional
dev=0
cuda_plan=0
for arg in "$@"; do
    case "$arg" in
        --data=required | --data=optional | --data=skip) data_mode="${arg#--data=}" ;;
        --dev) dev=1 ;;
        --cuda-plan) cuda_plan=1 ;;
        -h | --help)
            sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup: unknown argument '$arg' (see --help)" >&2
            exit 2
            ;;
    esac
done

# --cuda-plan: its answer alone on stdout (fd 3), the steps on stderr.
if ((cuda_plan)); then
    exec 3>&1 1>&2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV=.venv
STAMP="$VENV/.mlaan-torch"
TB_STAMP="$VENV/.mlaan-tensorboard"
CUDA_STAMP="$VENV/.mlaan-cuda"

step() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# The torch version in a torch directory ('2.11.0+cu130' -> '2.11.0'); empty if unknown.
# PyPI's torch has version.py; a libtorch zip has build-version.
torch_version_in() {
    if [[ -f "$1/version.py" ]]; then
        sed -n "s/^__version__ *= *['\"]\([^'\"+]*\).*/\1/p" "$1/version.py" | head -n 1
    elif [[ -f "$1/build-version" ]]; then
        cut -d+ -f1 "$1/build-version" | head -n 1
    fi
}

# 1. The venv (recreated if a previous attempt left it without a working python); sets $site,
# where its packages live (python3.X differs between machines).
ensure_venv() {
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' 2>/dev/null; then
        step "venv: $VENV exists"
    else
        [[ -e "$VENV" ]] && note "$VENV exists but its python does not run (Python moved?): recreating it"
        step "venv: creating $VENV with $(command -v python3 || echo 'python3 (not found)')"
        command -v python3 >/dev/null || die "python3 not found; install Python 3 (apt-get install python3 python3-venv)"
        rm -rf "$VENV" "$STAMP" "$TB_STAMP"
        python3 -m venv "$VENV" ||
            die "'python3 -m venv' failed; on Debian install python3-venv (apt-get install -y python3-venv) and rerun"
    fi
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
}

# Install exactly these wheels into the venv, resolving nothing (--no-deps).
pip_pinned() {
    "$VENV/bin/python" -m pip install --no-input --disable-pip-version-check --no-deps "$@"
}

case "${CUDA:-auto}" in
    1 | yes | true | 0 | no | false | auto) ;;
    *) die "CUDA=${CUDA}: use CUDA=1 (install torch's CUDA libraries) or CUDA=0 (never), or leave it unset" ;;
esac

# Whether this machine has an NVIDIA driver: its kernel module's version file, or nvidia-smi
# listing a GPU. MLAAN_GPU_PROBE replaces the probe (tests, unusual installs).
driver_present() {
    if [[ -n "${MLAAN_GPU_PROBE:-}" ]]; then
        bash -c "$MLAAN_GPU_PROBE" >/dev/null 2>&1
    elif [[ -r /proc/driver/nvidia/version ]]; then
        return 0
    else
        command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
    fi
}

# Why step 3b installs torch's CUDA libraries, or nothing (empty) when it does not.
cuda_reason() {
    case "${CUDA:-auto}" in
        1 | yes | true) echo "CUDA=${CUDA} asks for them" ;;
        0 | no | false) ;;
        *) driver_present && echo "an NVIDIA driver is present" || true ;;
    esac
}

# The CUDA libraries torch's wheel pins for this platform, one requirement per line, read from
# its installed metadata (Requires-Dist, markers evaluated by pip's own packaging): cuda-toolkit
# with its extras and the nvidia-* wheels. The Python-only ones (cuda-bindings, triton) are not
# what libtorch_cuda.so needs.
cuda_requirements() {
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement
for line in md.requires("torch") or []:
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    if r.name == "cuda-toolkit" or r.name.startswith("nvidia-"):
        extras = "[" + ",".join(sorted(r.extras)) + "]" if r.extras else ""
        print(f"{r.name}{extras}{r.specifier}")
PY
}

# 3b. torch's CUDA libraries into the venv (pip resolves cuda-toolkit's extras to their exact
# wheels), then a check that libtorch_cuda.so now loads, with the loader's message if not.
install_cuda_libraries() {
    local reason reqs want
    reason="$(cuda_reason)"
    if [[ -z "$reason" ]]; then
        step "cuda: no NVIDIA driver here (CUDA=1 installs torch's CUDA libraries anyway): CPU only"
        return
    fi
    mapfile -t reqs < <(cuda_requirements)
    ((${#reqs[@]})) || die "torch's metadata in $VENV names no CUDA library to install"
    want="${reqs[*]}"
    if [[ "$(cat "$CUDA_STAMP" 2>/dev/null)" == "$want" ]]; then
        step "cuda: torch's CUDA libraries already installed ($reason)"
    else
        step "cuda: $reason: installing torch's CUDA libraries (about 3 GB): ${want}"
        rm -f "$CUDA_STAMP"
        "$VENV/bin/python" -m pip install --no-input --disable-pip-version-check --no-warn-conflicts "${reqs[@]}"
        printf '%s\n' "$want" >"$CUDA_STAMP"
    fi
    "$VENV/bin/python" - "$torch_dir/lib/libtorch_cuda.so" <<'PY' ||
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
PY
        die "libtorch_cuda.so does not load after installing torch's CUDA libraries (the message above names what is missing)"
    step "cuda: libtorch_cuda.so loads"
}

# ---------------------------------------------------------------------------------------------
# 1-3. libtorch
# ---------------------------------------------------------------------------------------------
if [[ -n "${LIBTORCH:-}" ]]; then
    step "libtorch: LIBTORCH is set to $LIBTORCH (environment); not using .venv"
    v="$(torch_version_in "$LIBTORCH")"
    [[ -n "$v" ]] ||
        die "LIBTORCH=$LIBTORCH is not a torch directory (no version.py or build-version); unset LIBTORCH to use .venv"
    [[ "$v" == "${TORCH_VERSION%.*}".* ]] ||
        die "LIBTORCH=$LIBTORCH is torch $v, need ${TORCH_VERSION%.*}.x; unset LIBTORCH to use .venv"
    step "libtorch: torch $v"
else
    # 1. venv
    ensure_venv
    torch_dir="$site/torch"
    want="${TORCH_PACKAGES[*]}"

    # 2. torch, skipped when the stamp names exactly these wheels and version.py agrees
    if [[ "$(cat "$STAMP" 2>/dev/null)" == "$want" && "$(torch_version_in "$torch_dir")" == "$TORCH_VERSION" ]]; then
        step "torch: $TORCH_VERSION already installed"
    else
        step "torch: installing ${want} (--no-deps; about 520 MB to download)"
        rm -f "$STAMP"
        pip_pinned "${TORCH_PACKAGES[@]}"
        got="$(torch_version_in "$torch_dir")"
        [[ "$got" == "$TORCH_VERSION" ]] ||
            die "after pip install, $torch_dir/version.py says '${got:-nothing}', expected $TORCH_VERSION"
        printf '%s\n' "$want" >"$STAMP"
    fi

    # 3. .libtorch -> the venv's torch directory, as a relative link
    rel="$("$VENV/bin/python" -c 'import os, sys; print(os.path.relpath(sys.argv[1]))' "$torch_dir")"
    if [[ -e .libtorch && ! -L .libtorch ]]; then
        note ".libtorch is a real file or directory, not a link: leaving it alone"
    elif [[ "$(readlink .libtorch 2>/dev/null)" == "$rel" ]]; then
        step "libtorch: .libtorch -> $rel"
    else
        ln -sfn "$rel" .libtorch
        step "libtorch: linked .libtorch -> $rel"
    fi

    # 3b. CUDA libraries, when this machine can use them
    if ((!cuda_plan)); then
        install_cuda_libraries
    fi
fi

if ((cuda_plan)); then
    if [[ -n "${LIBTORCH:-}" ]]; then
        step "cuda: LIBTORCH is set: that torch brings its own CUDA libraries; step 3b does not apply"
    elif reason="$(cuda_reason)" && [[ -n "$reason" ]]; then
        step "cuda: $reason: step 3b installs"
        cuda_requirements >&3
    else
        step "cuda: no NVIDIA driver: step 3b installs nothing"
    fi
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 4. Gloo's headers (every build needs them; GLOO_INCLUDE points elsewhere, see docs/setup.md)
#    and libjpeg-turbo's
# ---------------------------------------------------------------------------------------------
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@"
}

if [[ -n "${GLOO_INCLUDE:-}" ]]; then
    [[ -f "$GLOO_INCLUDE/gloo/config.h" ]] || die "GLOO_INCLUDE=$GLOO_INCLUDE has no gloo/config.h"
    step "gloo: headers in $GLOO_INCLUDE (GLOO_INCLUDE)"
elif [[ -f "$GLOO_HEADER" ]]; then
    step "gloo: headers found ($GLOO_PACKAGE)"
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    step "gloo: installing Debian package $GLOO_PACKAGE (Gloo's C++ headers, about 1 MB)"
    apt_install "$GLOO_PACKAGE"
    [[ -f "$GLOO_HEADER" ]] || die "$GLOO_PACKAGE is installed but $GLOO_HEADER is missing"
else
    die "Gloo's C++ headers are missing ($GLOO_HEADER). Install them with:
        sudo apt-get update && sudo apt-get install -y $GLOO_PACKAGE
    or set GLOO_INCLUDE to a directory holding gloo/config.h (see docs/setup.md)"
fi

# libjpeg-turbo (every build: mlaan-data decodes JPEGs with it)
if [[ -f "$JPEG_HEADER" ]]; then
    step "libjpeg-turbo: headers found ($JPEG_PACKAGE)"
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    step "libjpeg-turbo: installing Debian package $JPEG_PACKAGE (headers and library, about 1 MB)"
    apt_install "$JPEG_PACKAGE"
    [[ -f "$JPEG_HEADER" ]] || die "$JPEG_PACKAGE is installed but $JPEG_HEADER is missing"
else
    die "libjpeg-turbo's headers are missing ($JPEG_HEADER). Install them with:
        sudo apt-get update && sudo apt-get install -y $JPEG_PACKAGE"
fi

# ---------------------------------------------------------------------------------------------
# 5. Fashion-MNIST
# ---------------------------------------------------------------------------------------------
have_data() {
    local f
    for f in "${DATA_FILES[@]}"; do
        [[ -f "$DATA_DIR/$f.gz" || -f "$DATA_DIR/$f" ]] || return 1
    done
}

if [[ "$data_mode" != skip ]]; then
    if have_data; then
        step "data: Fashion-MNIST found in $DATA_DIR"
    elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        step "data: installing Debian package $DATA_PACKAGE (Fashion-MNIST, about 30 MB)"
        apt_install "$DATA_PACKAGE"
        have_data || die "$DATA_PACKAGE is installed but $DATA_DIR lacks ${DATA_FILES[*]}"
    else
        msg="Fashion-MNIST is not in $DATA_DIR. Install it with:
        sudo apt-get update && sudo apt-get install -y $DATA_PACKAGE
    (or pass --dataset/--data-dir to use other data; see docs/data.md)"
        if [[ "$data_mode" == required ]]; then
            die "$msg"
        fi
        step "data: $msg"
        note "(not needed by the tests; \`make run\` needs it)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 6. Contributor tools for `make test`: TensorBoard (for the event-file tests), fmt, clippy
# ---------------------------------------------------------------------------------------------
if [[ "$dev" == 1 ]]; then
    [[ -n "${site:-}" ]] || ensure_venv
    want_tb="${TENSORBOARD_PACKAGES[*]}"
    if [[ "$(cat "$TB_STAMP" 2>/dev/null)" == "$want_tb" && -d "$site/tensorboard" ]]; then
        step "tensorboard: ${TENSORBOARD_PACKAGES[0]#*==} already installed"
    else
        step "tensorboard: installing ${TENSORBOARD_PACKAGES[0]} and its dependencies (about 45 MB)"
        rm -f "$TB_STAMP"
        pip_pinned "${TENSORBOARD_PACKAGES[@]}"
        "$VENV/bin/python" -c 'from tensorboard.backend.event_processing import event_accumulator' ||
            die "tensorboard is installed in $VENV but its event reader does not import"
        printf '%s\n' "$want_tb" >"$TB_STAMP"
    fi
    if [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] &&
        command -v sbatch >/dev/null; then
        step "slurm: slurmctld, slurmd, sbatch and munged present"
    elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        step "slurm: installing Debian packages ${SLURM_PACKAGES[*]} (a one-machine cluster for tests/slurm.rs, about 30 MB)"
        apt_install "${SLURM_PACKAGES[@]}"
    else
        note "slurm: not installed, so tests/slurm.rs skips its tests; to run them:
        sudo apt-get update && sudo apt-get install -y ${SLURM_PACKAGES[*]}"
    fi
    missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if ((${#missing[@]})); then
        die "cargo is missing ${missing[*]}; install with: rustup component add ${missing[*]}"
    fi
    step "tools: cargo fmt and cargo clippy present"
fi

# mlaan-pipe: set-up, build, run and test. `make help` lists the targets; docs/setup.md explains
# what set-up installs. Every target installs what it needs first (scripts/setup.sh, a no-op
# once done), so `make run` and `make test` work on a fresh clone. On a machine with an NVIDIA
# driver set-up also installs torch's CUDA libraries; `CUDA=1` or `CUDA=0` on the command line
# (e.g. `make setup CUDA=1`) decides instead of the driver probe.

CARGO  ?= cargo
CONFIG ?= configs/default.toml
# Extra flags for `make run`, e.g. make run ARGS="--epochs 2 --devices cpu,cpu"
ARGS   ?=
BIN    := $(or $(CARGO_TARGET_DIR),target)/release/mlaan-pipe

.DEFAULT_GOAL := help
.PHONY: help setup build run test lint fmt clean distclean

help:
	@echo "make run        set up, build, train $(CONFIG) on Fashion-MNIST, print test accuracy"
	@echo "make test       set up, then cargo fmt --check, clippy -D warnings, cargo test (what CI runs)"
	@echo "make setup      install .venv with libtorch $(shell sed -n 's/^TORCH_VERSION=//p' scripts/setup.sh), the .libtorch link and the data"
	@echo "                (with an NVIDIA driver, or CUDA=1: also torch's CUDA libraries; CUDA=0: never)"
	@echo "make build      set up libtorch, then cargo build --release"
	@echo "make lint       cargo fmt --check and clippy -D warnings"
	@echo "make fmt        format the code"
	@echo "make clean      cargo clean;  make distclean  also removes .venv and .libtorch"

setup:
	@scripts/setup.sh

build:
	@scripts/setup.sh --data=skip
	$(CARGO) build --release

run:
	@scripts/setup.sh --data=required
	$(CARGO) build --release
	$(BIN) train --config $(CONFIG) $(ARGS)

# fmt and clippy, shared by `lint` and `test`
define LINT
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
endef

lint:
	@scripts/setup.sh --data=skip --dev
	$(LINT)

test:
	@scripts/setup.sh --dev
	$(LINT)
	$(CARGO) test --release --workspace

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

distclean: clean
	rm -rf .venv .libtorch

//! The training engine, in layers that import only downwards (docs/design.md, "Layers"; the
//! test `tests/layers.rs` keeps it so):
//!
//! 1. [`error`] and the crate root: the error type and what a tensor weighs;
//! 2. [`wire`]: everything that crosses threads — messages forward and back, EMA snapshots,
//!    events, failures, module snapshots — and the hand-off that lands each one on the
//!    receiving stage's device and stream;
//! 3. [`optim`] and [`init`]: the optimizer with its savable state, and initial weights;
//! 4. [`module`]: one local module at work (five operations; its step, state, statistics,
//!    fp16 scaling and replicas each in a file of their own);
//! 5. [`stage`]: the modules sharing a device and a thread, their input, evaluation and
//!    memory;
//! 6. [`pipeline`]: stage threads driven by the pure schedules of `mlaan_core::schedule`, and
//!    the coordinator's handle; [`profile`]: a measured cost per module for placement.
//!
//! It computes on tensors and talks over channels; files, metrics sinks and the run's cadence
//! belong to `mlaan-train`.

pub mod error;
pub mod init;
pub mod module;
pub mod optim;
pub mod pipeline;
pub mod profile;
pub mod stage;
pub mod wire;

pub use error::{chain, TrainError};

/// Bytes of a tensor's elements (0 for an undefined tensor).
pub fn bytes_of(t: &tch::Tensor) -> u64 {
    if !t.defined() {
        return 0;
    }
    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
}

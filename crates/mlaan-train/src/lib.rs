//! Training: modules at work ([`runner`]), groups of modules on one device ([`stage`]), the
//! threads and schedules that drive them ([`pipeline`]: `sequential` is `sync` on one stage
//! holding every module), the optimizer ([`optim`]), initial state ([`init`]), evaluation,
//! metrics ([`metrics`]), run directories ([`run_dir`]) and the top-level [`trainer`].

pub mod bench;
pub mod checkpoint;
pub mod devices;
pub mod export;
pub mod init;
pub mod metrics;
pub mod optim;
pub mod pipeline;
pub mod profile;
pub mod run_dir;
pub mod runner;
pub mod stage;
pub mod trainer;

use thiserror::Error;

/// Why training stopped.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("non-finite value in module {module} at batch {batch}: {what}")]
    NonFinite { module: usize, batch: u64, what: String },
    #[error("stage {stage} (modules {modules:?}) failed at batch {batch:?}: {cause}")]
    Stage { stage: usize, modules: Vec<usize>, batch: Option<u64>, cause: String },
    /// A neighbouring stage went away: a consequence of another failure, not a cause.
    #[error("{0}")]
    Peer(String),
    #[error("internal protocol error: {0}")]
    Protocol(String),
    #[error("data: {0}")]
    Data(String),
    #[error("stopped")]
    Stopped,
    #[error("{0}")]
    Other(String),
}

/// Bytes of a tensor's elements (0 for an undefined tensor).
pub fn bytes_of(t: &tch::Tensor) -> u64 {
    if !t.defined() {
        return 0;
    }
    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
}

//! Training: modules at work ([`runner`]), groups of modules on one device ([`stage`]), the
//! threads and schedules that drive them ([`pipeline`]: `sequential` is `sync` on one stage
//! holding every module), the optimizer ([`optim`]), initial state ([`init`]), evaluation,
//! metrics ([`metrics`]), run directories ([`run_dir`]), the run's boundaries ([`cadence`]) and
//! the top-level [`trainer`].

pub mod bench;
pub mod cadence;
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
    /// A stage failed; `cause` is what it failed with, still matchable (a non-finite loss
    /// stays [`TrainError::NonFinite`] through the pipeline, see [`TrainError::root`]). The
    /// message includes the cause's own chain, so it is not also a `source`.
    #[error("stage {stage} (modules {modules:?}) failed at batch {batch:?}: {}", chain(cause))]
    Stage { stage: usize, modules: Vec<usize>, batch: Option<u64>, cause: Box<TrainError> },
    /// A stage thread panicked (caught; the message is the panic's).
    #[error("panicked: {0}")]
    Panicked(String),
    /// A neighbouring stage went away: a consequence of another failure, not a cause.
    #[error("{0}")]
    Peer(String),
    #[error("internal protocol error: {0}")]
    Protocol(String),
    #[error("data: {0}")]
    Data(String),
    /// A file could not be read or written (checkpoints); the I/O error is the source.
    #[error("{}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A fault injected by a drill (`--inject-fault error@STAGE:BATCH`).
    #[error("injected error at batch {0}")]
    Injected(u64),
    #[error("stopped")]
    Stopped,
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    /// The error a stage failed with, through any [`TrainError::Stage`] wrapping.
    pub fn root(&self) -> &TrainError {
        match self {
            TrainError::Stage { cause, .. } => cause.root(),
            other => other,
        }
    }
}

/// An error and its sources, `: `-separated, as `{:#}` of anyhow shows them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Bytes of a tensor's elements (0 for an undefined tensor).
pub fn bytes_of(t: &tch::Tensor) -> u64 {
    if !t.defined() {
        return 0;
    }
    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
}

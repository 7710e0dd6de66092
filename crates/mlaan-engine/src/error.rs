//! Why training stopped: the engine's one error type, and how its chain reads. The bottom of
//! the engine (docs/design.md, "Layers"): it imports nothing of the crate.

use thiserror::Error;

/// Why training stopped.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A stream, event, autocast or layout call into libtorch failed.
    #[error("libtorch: {0}")]
    Accel(#[from] mlaan_accel::AccelError),
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
    /// A module's state does not fit its networks (a missing tensor, a wrong shape, momentum
    /// for a parameter the module does not have).
    #[error("module {module}: {message}")]
    State { module: usize, message: String },
    /// The placement asks for more stages than there are devices.
    #[error("{stages} stages but only {devices} devices")]
    TooFewDevices { stages: usize, devices: usize },
    /// The operating system refused a stage thread.
    #[error("cannot start stage {stage}")]
    Spawn {
        stage: usize,
        #[source]
        source: std::io::Error,
    },
    /// A collective among the replicas of a module failed (a peer died, hung or left);
    /// `peers` is what the heartbeats say about who is to blame.
    #[error("module {module}'s replica group: {cause}; {peers}")]
    Replica { module: usize, cause: mlaan_dist::DistError, peers: mlaan_dist::Peers },
    /// A fault injected by a drill (`--inject-fault error@STAGE:BATCH`).
    #[error("injected error at batch {0}")]
    Injected(u64),
    #[error("stopped")]
    Stopped,
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
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

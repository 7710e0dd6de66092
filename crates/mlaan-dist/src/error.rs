use thiserror::Error;

/// Why a distributed operation failed. Every message names the operation and where it was
/// going: the store's address, or the group and the rank that saw the failure.
#[derive(Debug, Error)]
pub enum DistError {
    /// The rendezvous environment is incomplete or contradictory.
    #[error("distributed environment: {0}")]
    Env(String),
    /// A store operation failed (unreachable server, busy port, a key that never came).
    #[error("store {addr}: {op}: {message}")]
    Store { addr: String, op: String, message: String },
    /// A collective failed or timed out (a peer died, closed its socket or never came).
    #[error("{op} in group '{group}' (rank {rank} of {world}): {message}")]
    Collective { op: &'static str, group: String, rank: usize, world: usize, message: String },
    /// A library or device the collective needs is not there (NCCL not loadable, a CPU
    /// tensor for NCCL); the message says why and what was tried.
    #[error("{what}: {message}")]
    Unavailable { what: &'static str, message: String },
    /// A tensor a collective cannot take (not contiguous, wrong shape).
    #[error("{op} in group '{group}': {message}")]
    BadTensor { op: &'static str, group: String, message: String },
}

//! Collectives between processes, on PyTorch's own distributed engine (c10d) rather than one
//! written here: a [`Store`] (c10d's TCPStore; rank 0 serves it) for rendezvous and small
//! metadata, and [`Group`]s (c10d's ProcessGroupGloo under a PrefixStore) for all-reduce,
//! broadcast, all-gather and barrier on tensors, each bounded by a timeout. [`env`] reads the
//! rendezvous the launchers set (torchrun, SLURM, `mlaan-pipe launch`).
//!
//! The C++ side (`cpp/c10d_bridge.cpp`) catches every exception and returns it as a
//! [`DistError`] naming the operation, the group and the rank, so a dead peer or a busy port is
//! an error value, never an abort.

pub mod env;
mod error;
mod ffi;
mod group;
pub mod liveness;
pub mod nccl;
mod store;

pub use env::{Launch, LaunchSource};
pub use error::DistError;
pub use group::{Bind, Group};
pub use liveness::{Heartbeat, Peers};
pub use store::Store;

/// The library that reduces a replica group's tensors, once the ranks have chosen
/// (`distributed.backend = "auto"` resolves to one of these per module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reducer {
    /// c10d's Gloo, in host memory.
    Gloo,
    /// NCCL, on the GPU and on the stage's stream.
    Nccl,
}

impl std::fmt::Display for Reducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reducer::Gloo => "gloo",
            Reducer::Nccl => "nccl",
        })
    }
}

/// Result of a distributed operation.
pub type Result<T, E = DistError> = std::result::Result<T, E>;

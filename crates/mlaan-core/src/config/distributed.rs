//! `[distributed]`: data-parallel replicas of the pipeline, one process each.

use super::{bad_value, is_positive};
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// Data-parallel replicas of the pipeline, one process each (launched by torchrun, SLURM or
/// `mlaan-pipe launch`, which say how many; see docs/distributed.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Processes (replicas) the run expects; 0 = as many as the launcher started. The
    /// resolved config records the launched number.
    pub world_size: usize,
    /// Seconds a collective or the start-up rendezvous waits for a peer before failing.
    pub timeout_s: f64,
    /// Gradients are all-reduced in flat buckets of at most this many MiB.
    pub bucket_mb: f64,
    /// Which library all-reduces a module's gradients across the replicas.
    pub backend: Backend,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            world_size: 0,
            timeout_s: 300.0,
            bucket_mb: 25.0,
            backend: Backend::Auto,
        }
    }
}

/// The collective library of the replica groups (`distributed.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// NCCL for modules on CUDA stages when it loads and every rank of the group has its own
    /// GPU; Gloo otherwise.
    Auto,
    /// c10d's Gloo: host memory (a CUDA bucket is copied to the host and back).
    Gloo,
    /// NCCL on the GPU, on the stage's stream; every stage must be on a CUDA device.
    Nccl,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

impl DistributedConfig {
    /// A finite time-out and bucket size > 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_positive(self.timeout_s) {
            return Err(bad_value("distributed.timeout_s", self.timeout_s, "must be > 0"));
        }
        if !is_positive(self.bucket_mb) {
            return Err(bad_value("distributed.bucket_mb", self.bucket_mb, "must be > 0"));
        }
        Ok(())
    }
}

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
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig { world_size: 0, timeout_s: 300.0, bucket_mb: 25.0 }
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

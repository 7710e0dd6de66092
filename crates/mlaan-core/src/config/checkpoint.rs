//! `[checkpoint]`: when checkpoints are written and how many are kept.

use super::bad_value;
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// When to checkpoint (`[checkpoint]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint every N steps; 0 = only at epoch ends (if `at_epoch_end`).
    pub every_steps: usize,
    pub at_epoch_end: bool,
    /// Complete checkpoints kept; older ones are deleted.
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every_steps: 0, at_epoch_end: true, keep_last: 3 }
    }
}

impl CheckpointConfig {
    /// At least one checkpoint is kept.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.keep_last == 0 {
            return Err(bad_value("checkpoint.keep_last", self.keep_last, "must be ≥ 1"));
        }
        Ok(())
    }
}

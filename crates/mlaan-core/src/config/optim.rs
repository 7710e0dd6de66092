//! `[optim]`: SGD and its learning-rate schedule (linear warm-up, then cosine to a floor).

use super::{bad_value, is_non_negative};
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// The optimizer of every module (`[optim]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Linear warm-up length in epochs (fractions allowed).
    pub warmup_epochs: f64,
    /// Learning rate at the start of the warm-up.
    pub warmup_start_lr: f64,
    /// Floor of the cosine schedule.
    pub min_lr: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
            warmup_epochs: 0.0,
            warmup_start_lr: 0.01,
            min_lr: 0.0,
        }
    }
}

impl OptimConfig {
    /// A finite learning rate > 0, momentum in [0, 1), weight decay and warm-up ≥ 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(bad_value("optim.lr", self.lr, "must be a finite number > 0"));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(bad_value("optim.momentum", self.momentum, "must be in [0, 1)"));
        }
        if !is_non_negative(self.weight_decay) {
            return Err(bad_value("optim.weight_decay", self.weight_decay, "must be ≥ 0"));
        }
        if !is_non_negative(self.warmup_epochs) {
            return Err(bad_value("optim.warmup_epochs", self.warmup_epochs, "must be ≥ 0"));
        }
        Ok(())
    }
}

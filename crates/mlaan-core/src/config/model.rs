//! `[model]`: the backbone and how it is cut into K gradient-isolated modules.

use super::bad_value;
use crate::arch::ArchSpec;
use crate::error::ConfigError;
use crate::split::{Split, SplitSpec};
use serde::{Deserialize, Serialize};

/// The backbone and its split (`[model]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `resnet20`, `resnet32`, `resnet110`, `resnet34`, ... (see `ArchSpec::from_name`).
    pub arch: String,
    /// Number of gradient-isolated modules.
    pub k: usize,
    /// How the backbone is cut into K modules.
    pub split: SplitSpec,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { arch: "resnet32".into(), k: 1, split: SplitSpec::default() }
    }
}

impl ModelConfig {
    /// K is at least 1, the architecture is known and the split fits it. A split the
    /// architecture cannot give is blamed on `model.k` when the split is `auto` (K is what the
    /// user chose), on `model.split` otherwise.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.k == 0 {
            return Err(bad_value("model.k", self.k, "must be at least 1"));
        }
        let arch = ArchSpec::from_name(&self.arch)
            .map_err(|e| bad_value("model.arch", &self.arch, &e.to_string()))?;
        Split::resolve(&arch, self.k, &self.split).map_err(|e| match &self.split {
            SplitSpec::Named(n) if n == "auto" => bad_value("model.k", self.k, &e.to_string()),
            split => bad_value("model.split", split, &e.to_string()),
        })?;
        Ok(())
    }
}

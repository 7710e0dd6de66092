//! `[train]`: how long and in what batches to train, logging and evaluation, and how each
//! stage computes (precision, memory format, cuDNN and TF32 switches).

use super::bad_value;
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// The training loop (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Evaluation batch size; 0 = same as training.
    pub eval_batch_size: usize,
    pub seed: u64,
    /// Write a metrics record every N optimizer steps.
    pub log_every: usize,
    /// Stop after this many steps (0 = run all epochs); the schedule still spans all epochs.
    pub max_steps: usize,
    /// Evaluate on the test set after every epoch (otherwise only at the end).
    pub eval_every_epoch: bool,
    /// Write TensorBoard event files (`events.out.tfevents.*`) into the run directory.
    pub tensorboard: bool,
    /// Compute dtype: `bf16` and `fp16` run each stage under autocast with float32 master
    /// weights, optimizer state and EMA twins; `fp16` adds a dynamic loss scale per module.
    pub precision: Precision,
    /// Layout of convolution activations and weights (`channels-last` is what cuDNN's tensor
    /// cores want; on CPU it gives the same numbers in another layout).
    pub memory_format: MemoryFormat,
    /// cuDNN's autotuner (CUDA only): picks the fastest convolution kernel per shape once.
    pub cudnn_benchmark: bool,
    /// TF32 in float32 matrix products and convolutions (CUDA only).
    pub tf32: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 128,
            eval_batch_size: 0,
            seed: 0,
            log_every: 20,
            max_steps: 0,
            eval_every_epoch: false,
            tensorboard: true,
            precision: Precision::Fp32,
            memory_format: MemoryFormat::Contiguous,
            cudnn_benchmark: true,
            tf32: true,
        }
    }
}

/// The dtype stages compute in (`train.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

/// Layout of 4-d activations and convolution weights (`train.memory_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryFormat {
    Contiguous,
    ChannelsLast,
}

impl std::fmt::Display for MemoryFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryFormat::Contiguous => "contiguous",
            MemoryFormat::ChannelsLast => "channels-last",
        })
    }
}

impl TrainConfig {
    /// At least one epoch, a batch of at least one sample, a log interval of at least one step.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.epochs == 0 {
            return Err(bad_value("train.epochs", self.epochs, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(bad_value("train.batch_size", self.batch_size, "must be at least 1"));
        }
        if self.log_every == 0 {
            return Err(bad_value("train.log_every", self.log_every, "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::load_text as load;
    use crate::config::{RunConfig, StreamMode};

    #[test]
    fn compute_settings_are_typed_and_bad_values_quoted() {
        let c = load(
            "[train]\nprecision = \"bf16\"\nmemory_format = \"channels-last\"\n",
            &["pipeline.streams=default", "train.tf32=false"],
        )
        .unwrap();
        assert_eq!(c.train.precision, Precision::Bf16);
        assert_eq!(c.train.memory_format, MemoryFormat::ChannelsLast);
        assert_eq!(c.pipeline.streams, StreamMode::Default);
        assert!(!c.train.tf32 && c.train.cudnn_benchmark);
        let d = RunConfig::default();
        assert_eq!(
            (d.train.precision, d.train.memory_format, d.pipeline.streams),
            (Precision::Fp32, MemoryFormat::Contiguous, StreamMode::PerStage)
        );
        for (o, quoted, expected) in [
            ("train.precision=bf17", "`bf17`", "`bf16`"),
            ("train.memory_format=nhwc", "`nhwc`", "`channels-last`"),
            ("pipeline.streams=many", "`many`", "`per-stage`"),
        ] {
            let e = load("", &[o]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{o}`")) && e.contains(quoted) && e.contains(expected),
                "{e}"
            );
        }
        let e = load("[train]\n\nprecision = \"half\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("`half`"), "{e}");
        let e = load("", &["train.cudnn_benchmark=\"yes\""]).unwrap_err().to_string();
        assert!(e.contains("cudnn_benchmark") && e.contains("yes"), "{e}");
    }
}

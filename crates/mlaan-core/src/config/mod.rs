//! The run configuration: typed sections with defaults, read from TOML, overridden from the
//! command line, validated once, and written into the run directory as resolved.
//!
//! Precedence: command-line flags > `--set section.key=value` > config file > defaults.
//! Unknown keys and values of the wrong type are errors that quote them.
//!
//! One file per section (`[model]`, `[method]`, `[data]`, `[optim]`, `[train]`, `[pipeline]`,
//! `[checkpoint]`, `[distributed]`) holds its types, defaults and the checks that involve it
//! alone; `rules` holds the checks between sections and `load` the reading and error blame.

mod checkpoint;
mod data;
mod distributed;
mod load;
mod method;
mod model;
mod optim;
mod pipeline;
mod rules;
mod train;

pub use checkpoint::CheckpointConfig;
pub use data::{AugmentConfig, DataConfig, OnBadSample, PadMode, DEFAULT_MAX_IMAGE_PIXELS};
pub use distributed::{Backend, DistributedConfig};
pub use load::{set_dotted, ConfigSource};
pub use method::{
    AugLocalCascade, AugLocalConfig, EmaLagRule, EmaUpdate, HeadKind, InfoProMode, Method,
    MethodConfig,
};
pub use model::ModelConfig;
pub use optim::OptimConfig;
pub use pipeline::{OnNonFinite, PipelineConfig, PlacementRule, Schedule, StreamMode};
pub use train::{MemoryFormat, Precision, TrainConfig};

use crate::device::DeviceSpec;
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// Everything that defines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub method: MethodConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub pipeline: PipelineConfig,
    pub checkpoint: CheckpointConfig,
    pub distributed: DistributedConfig,
}

impl RunConfig {
    /// Check values that types alone cannot; the message names the key and quotes the value.
    ///
    /// The first bad value found is reported, in the order a user would fix them: the network
    /// and its split first, then what the method asks of it, then the other sections, with
    /// each rule between sections after the sections it reads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Whether the network can be cut as asked comes before what the method does with it.
        self.model.validate()?;
        rules::method_fits_model(self)?;
        self.method.validate()?;
        rules::head_fits_model(self)?;
        self.optim.validate()?;
        self.train.validate()?;
        rules::layout_fits_model(self)?;
        self.pipeline.validate()?;
        rules::micro_batches_fit(self)?;
        rules::e2e_is_not_async(self)?;
        self.data.validate()?;
        self.distributed.validate()?;
        rules::nccl_needs_gpus(self)?;
        self.checkpoint.validate()?;
        Ok(())
    }
}

/// How a run computes, as `plan` prints it and `summary.json` records it: the compute dtype
/// and layout everywhere, and the CUDA-only switches (`cuda = false`: they had no effect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeReport {
    pub precision: Precision,
    pub memory_format: MemoryFormat,
    pub streams: StreamMode,
    pub cudnn_benchmark: bool,
    pub tf32: bool,
    /// Whether any stage runs on a CUDA device.
    pub cuda: bool,
}

impl ComputeReport {
    pub fn of(cfg: &RunConfig) -> Self {
        ComputeReport {
            precision: cfg.train.precision,
            memory_format: cfg.train.memory_format,
            streams: cfg.pipeline.streams,
            cudnn_benchmark: cfg.train.cudnn_benchmark,
            tf32: cfg.train.tf32,
            cuda: cfg.pipeline.devices.iter().any(|d| matches!(d, DeviceSpec::Cuda(_))),
        }
    }
}

impl std::fmt::Display for ComputeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "{}, {}; CUDA: {}, cuDNN benchmark {}, TF32 {}",
            self.precision,
            self.memory_format,
            match self.streams {
                StreamMode::PerStage => "a stream per stage",
                StreamMode::Default => "the default stream",
            },
            on(self.cudnn_benchmark),
            on(self.tf32)
        )?;
        if !self.cuda {
            f.write_str(" (no CUDA device: unused)")?;
        }
        Ok(())
    }
}

/// The error of `key` holding `value`, which is bad for `reason`.
fn bad_value(key: &str, value: impl std::fmt::Debug, reason: &str) -> ConfigError {
    ConfigError::BadValue { key: key.into(), value: format!("{value:?}"), reason: reason.into() }
}

/// A finite number > 0 (false for NaN).
fn is_positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// A finite number ≥ 0 (false for NaN).
fn is_non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

#[cfg(test)]
mod tests {
    use super::load::load_text as load;
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = RunConfig::default();
        c.validate().unwrap();
        let back: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn an_impossible_split_is_reported_before_method_rules() {
        // e2e (the default method) with K > 1 under async would be refused too, but the K
        // that the architecture cannot give is the first thing to fix.
        let e = load("", &["model.k=99"]).unwrap_err().to_string();
        assert!(e.contains("model.k") && e.contains("99") && e.contains("15 blocks"), "{e}");
        let e = load("", &["model.arch=\"resnet7\""]).unwrap_err().to_string();
        assert!(e.contains("model.arch") && e.contains("resnet7"), "{e}");
    }

    #[test]
    fn bad_values_are_quoted() {
        let e = load("[optim]\nlr = -1.0\n", &[]).unwrap_err().to_string();
        assert!(e.contains("optim.lr") && e.contains("-1"), "{e}");
        let e = load("[method]\nname = \"backprop\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("backprop"), "{e}");
        let e = load("[train]\nbatch_size = \"big\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("big") || e.contains("batch_size"), "{e}");
        let e = load("[method]\nname = \"dgl\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("model.k"), "{e}");
        let e = load("", &["pipeline.devices=[\"tpu:0\"]"]).unwrap_err().to_string();
        assert!(e.contains("tpu"), "{e}");
        let e = load("[model\n", &[]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn the_first_bad_value_in_check_order_is_reported() {
        // Sections in order, each rule between sections after the sections it reads.
        let e = load("[optim]\nlr = 0.0\n[checkpoint]\nkeep_last = 0\n", &[]).unwrap_err();
        assert!(e.to_string().contains("optim.lr"), "{e}");
        let e = load("", &["method.name=dgl", "method.w_ind=-1"]).unwrap_err().to_string();
        assert!(e.contains("model.k") && e.contains("needs at least 2 modules"), "{e}");
        let e = load("", &["pipeline.micro_batches=3"]).unwrap_err().to_string();
        assert!(e.contains("divide train.batch_size (128)"), "{e}");
        let e = load("", &["pipeline.micro_batches=2", "data.cifar100_labels=x"]).unwrap_err();
        assert!(e.to_string().contains("needs schedule sync"), "{e}");
        let e = load("", &["model.k=2", "pipeline.in_flight=0"]).unwrap_err().to_string();
        assert!(e.contains("pipeline.in_flight"), "{e}");
    }
}

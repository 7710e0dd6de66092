//! `[pipeline]`: how the modules run: the schedule, the devices and how modules are placed on
//! them, batches in flight, micro-batches, recomputation, CUDA streams and what a stage does
//! with a non-finite loss.

use super::bad_value;
use crate::device::DeviceSpec;
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// How the modules are scheduled (docs/design.md, "Stages and schedules").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Sequential,
    Sync,
    Async,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Sequential => "sequential",
            Schedule::Sync => "sync",
            Schedule::Async => "async",
        })
    }
}

/// What a stage does with a non-finite loss: fail the run, or drop the batch from that module
/// on (every later module drops it too; see docs/design.md, "A non-finite loss").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

/// How modules are grouped onto stages when there are more modules than devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementRule {
    /// A measured profile of each module (the default).
    Auto,
    /// Training FLOPs per sample, counted (backbone, heads, auxiliary networks, LAM chains,
    /// recomputation); no timed profile.
    Flops,
    /// A measured profile, as `auto`.
    Profile,
}

impl std::fmt::Display for PlacementRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlacementRule::Auto => "auto",
            PlacementRule::Flops => "flops",
            PlacementRule::Profile => "profile",
        })
    }
}

/// Which CUDA stream a stage thread queues its kernels on (`pipeline.streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMode {
    /// Its own stream from libtorch's pool, so that stages sharing a GPU overlap.
    PerStage,
    /// The device's default stream, shared by every stage on it.
    Default,
}

impl std::fmt::Display for StreamMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamMode::PerStage => "per-stage",
            StreamMode::Default => "default",
        })
    }
}

/// The stages and how they run (`[pipeline]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub schedule: Schedule,
    /// Devices, e.g. `["cpu"]`, `["cpu","cpu"]`, `["cuda:0","cuda:1"]`; parsed once, here.
    pub devices: Vec<DeviceSpec>,
    /// Batches a stage may hold in flight (channel capacity, stored inputs, gradient lag).
    pub in_flight: usize,
    pub placement: PlacementRule,
    /// Intra-op threads for CPU devices; 0 = cores divided among the CPU stages.
    pub intra_op_threads: usize,
    pub on_nonfinite: OnNonFinite,
    /// Under `on_nonfinite = "skip"`: stop the run when this many batches in a row had a
    /// non-finite loss (0: never).
    pub max_consecutive_skips: usize,
    /// Micro-batches per mini-batch (`sync` or `sequential`): every module accumulates its
    /// gradients over them and steps once per mini-batch. With `e2e` and K > 1 this is the
    /// GPipe baseline; for any method, the single-process reference of data parallelism.
    pub micro_batches: usize,
    /// Trade compute for memory: forward without keeping the module's graph and rebuild it
    /// for the backward passes (one more forward per batch), so that the module's graph and
    /// its auxiliary networks' graphs are never held together.
    pub recompute: bool,
    /// CUDA stream of each stage thread; no effect on CPU.
    pub streams: StreamMode,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            schedule: Schedule::Async,
            devices: vec![DeviceSpec::Cpu],
            in_flight: 2,
            placement: PlacementRule::Auto,
            intra_op_threads: 0,
            on_nonfinite: OnNonFinite::Stop,
            max_consecutive_skips: 10,
            micro_batches: 1,
            recompute: false,
            streams: StreamMode::PerStage,
        }
    }
}

impl PipelineConfig {
    /// At least one batch in flight and one device. What micro-batches need of the batch size
    /// and the schedule is checked in `rules`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.in_flight == 0 {
            return Err(bad_value("pipeline.in_flight", self.in_flight, "must be at least 1"));
        }
        if self.devices.is_empty() {
            return Err(bad_value("pipeline.devices", &self.devices, "needs at least one device"));
        }
        Ok(())
    }
}

//! What every stage of a pipeline shares: the schedule, the optimizer and its learning rate,
//! the EMA rule, the input's normalisation, and how stages compute (dtype, layout, streams).

use super::faults::Fault;
use crate::error::TrainError;
use crate::module::Replicas;
use crate::optim::LrSchedule;
use mlaan_core::config::{
    EmaLagRule, MemoryFormat, OnNonFinite, OptimConfig, Precision, Schedule, StreamMode,
};
use mlaan_core::micro::MicroBatches;
use mlaan_core::plan::ImageSpec;

/// Everything the stages share.
#[derive(Clone)]
pub struct PipelineSettings {
    pub schedule: Schedule,
    pub in_flight: usize,
    pub optim: OptimConfig,
    pub lr: LrSchedule,
    pub ema_momentum: f64,
    /// How twins pick snapshots (`auto` resolves by `schedule`).
    pub ema_lag: EmaLagRule,
    pub image: ImageSpec,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub log_every: u64,
    /// Batches per optimizer step (`pipeline.micro_batches`) and their numbering.
    pub micro: MicroBatches,
    pub on_nonfinite: OnNonFinite,
    pub fault: Option<Fault>,
    /// Rebuild module graphs for the backward passes (`pipeline.recompute`).
    pub recompute: bool,
    /// Intra-op threads of each stage thread, by stage (1 where missing).
    pub intra_op_threads: Vec<usize>,
    /// Data-parallel replicas of this pipeline in other processes (`None`: this one alone).
    pub replicas: Option<Replicas>,
    pub compute: ComputeSettings,
}

impl PipelineSettings {
    /// Whether a stage on `device` computes on its own stream (and its messages carry events).
    pub fn per_stage_streams(&self, device: tch::Device) -> bool {
        self.compute.streams == StreamMode::PerStage && device.is_cuda()
    }
}

/// How the stages compute: dtype, layout, streams (`train.precision`, `train.memory_format`,
/// `pipeline.streams`; the process-wide cuDNN/TF32 switches are set once by the session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeSettings {
    pub precision: Precision,
    pub memory_format: MemoryFormat,
    pub streams: StreamMode,
}

impl ComputeSettings {
    /// The autocast dtype, `None` for float32.
    pub fn autocast_kind(&self) -> Option<tch::Kind> {
        match self.precision {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(tch::Kind::BFloat16),
            Precision::Fp16 => Some(tch::Kind::Half),
        }
    }

    /// Set up the calling stage thread on `device`: its own pool stream under per-stage
    /// streams on CUDA, autocast in the compute dtype (both are per-thread state in libtorch).
    pub fn enter_stage_thread(&self, device: tch::Device) -> Result<(), TrainError> {
        if self.streams == StreamMode::PerStage && device.is_cuda() {
            // Pool streams live as long as the process; the handle can go.
            mlaan_accel::Stream::from_pool(device)?.make_current()?;
        }
        mlaan_accel::set_autocast(device, self.autocast_kind())?;
        Ok(())
    }
}

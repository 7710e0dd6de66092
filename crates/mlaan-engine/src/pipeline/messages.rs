//! What flows through a pipeline: messages forward, events to the coordinator, the state a
//! stage starts from and hands back, the settings every stage shares, and drill faults.

use crate::init::ModuleState;
use crate::module::BatchTargets;
use crate::optim::LrSchedule;
use crate::TrainError;
use mlaan_core::config::{
    EmaLagRule, MemoryFormat, OnNonFinite, OptimConfig, Precision, Schedule, StreamMode,
};
use mlaan_core::metrics::StageWindow;
use mlaan_core::plan::ImageSpec;
use tch::Tensor;

/// Messages flowing forward.
pub enum Forward {
    /// A training batch: stage input (raw `u8` images for stage 0) and targets.
    Train { id: u64, x: Tensor, targets: BatchTargets },
    /// Training batch `id`, dropped by an earlier stage for a non-finite loss
    /// (`pipeline.on_nonfinite = "skip"`): every later module drops it too.
    Skip { id: u64 },
    /// An evaluation batch.
    Eval { x: Tensor, labels: Tensor },
    /// Report evaluation counts and reset them.
    EvalEnd,
    /// Make every module's buffers (BatchNorm running statistics, EMA twins') rank 0's across
    /// the data-parallel replicas, so that they all evaluate rank 0's model; then pass on.
    TakeRank0Buffers,
    /// Apply every outstanding gradient, then pass on; the last stage reports `Drained`.
    Drain { tag: u64 },
    /// Send a CPU copy of every module's state to the coordinator (after a drain).
    Collect,
}

/// A CPU copy of one module: its stores (EMA twins prefixed `ema.`), its optimizer's momentum
/// buffers by parameter name, and its step count. Also what a stage starts from.
pub struct ModuleSnapshot {
    pub module: usize,
    pub state: ModuleState,
    pub momentum: Vec<(String, Tensor)>,
    pub step: u64,
    /// EMA snapshots received but not yet folded in: (real block, step, parameters).
    pub ema_backlog: Vec<(String, u64, Vec<Tensor>)>,
    /// The fp16 loss scale (scale, clean steps, skipped steps); `None` otherwise.
    pub loss_scale: Option<[f64; 3]>,
}

impl ModuleSnapshot {
    /// A fresh module: initial weights, no optimizer state.
    pub fn initial(module: usize, state: ModuleState) -> Self {
        ModuleSnapshot {
            module,
            state,
            momentum: Vec::new(),
            step: 0,
            ema_backlog: Vec::new(),
            loss_scale: None,
        }
    }

    pub(super) fn shallow_clone(&self) -> Self {
        let copy = |v: &[(String, Tensor)]| {
            v.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
        };
        ModuleSnapshot {
            module: self.module,
            state: copy(&self.state),
            momentum: copy(&self.momentum),
            step: self.step,
            ema_backlog: self
                .ema_backlog
                .iter()
                .map(|(b, s, p)| (b.clone(), *s, p.iter().map(Tensor::shallow_clone).collect()))
                .collect(),
            loss_scale: self.loss_scale,
        }
    }
}

/// Evaluation counts of one module.
#[derive(Debug, Clone, Default)]
pub struct ModuleEval {
    pub module: usize,
    pub correct: i64,
    pub seen: i64,
    /// Σ of per-sample cross-entropy of the final classifier (last module only).
    pub loss_sum: f64,
    pub has_head: bool,
}

/// What stages tell the coordinator.
pub enum Event {
    Window {
        stage: usize,
        window: StageWindow,
        step: u64,
        lr: f64,
        term_losses: Vec<(usize, Vec<f64>)>,
    },
    Eval {
        stage: usize,
        modules: Vec<ModuleEval>,
    },
    Drained {
        tag: u64,
    },
    State {
        stage: usize,
        modules: Vec<ModuleSnapshot>,
    },
    /// A stage dropped batch `batch` because of `cause` (a non-finite loss) and trains on.
    Skipped {
        stage: usize,
        batch: u64,
        cause: TrainError,
    },
    Failed(Failure),
    Exited {
        stage: usize,
        live_bytes: u64,
        peak_live_bytes: u64,
    },
}

/// Why a stage stopped. `secondary` failures are consequences of another stage's (a
/// neighbour disappeared); the coordinator reports a primary one when there is one.
#[derive(Debug)]
pub struct Failure {
    pub stage: usize,
    pub modules: Vec<usize>,
    pub batch: Option<u64>,
    pub cause: TrainError,
    pub secondary: bool,
}

impl Failure {
    pub(super) fn into_error(self) -> TrainError {
        TrainError::Stage {
            stage: self.stage,
            modules: self.modules,
            batch: self.batch,
            cause: Box::new(self.cause),
        }
    }
}

/// A fault to inject (tests): at `batch`, stage `stage` does `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub stage: usize,
    pub batch: u64,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Error,
    Panic,
    NaN,
    /// The stage drops its channels and returns as if finished.
    CloseChannel,
}

impl std::str::FromStr for Fault {
    type Err = String;
    /// `KIND@STAGE:BATCH`, e.g. `panic@1:5`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad fault `{s}` (KIND@STAGE:BATCH, KIND = error|panic|nan|close)");
        let (kind, at) = s.split_once('@').ok_or_else(bad)?;
        let (stage, batch) = at.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "error" => FaultKind::Error,
            "panic" => FaultKind::Panic,
            "nan" => FaultKind::NaN,
            "close" => FaultKind::CloseChannel,
            _ => return Err(bad()),
        };
        Ok(Fault {
            stage: stage.parse().map_err(|_| bad())?,
            batch: batch.parse().map_err(|_| bad())?,
            kind,
        })
    }
}

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
    pub accumulate: usize,
    pub on_nonfinite: OnNonFinite,
    pub fault: Option<Fault>,
    /// Rebuild module graphs for the backward passes (`pipeline.recompute`).
    pub recompute: bool,
    /// Intra-op threads of each stage thread, by stage (1 where missing).
    pub intra_op_threads: Vec<usize>,
    /// Data-parallel replicas of this pipeline in other processes (`None`: this one alone).
    pub replicas: Option<crate::module::Replicas>,
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

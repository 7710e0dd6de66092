//! Everything that crosses threads, in one place at the bottom of the engine: the messages a
//! stage sends forward ([`Forward`]) and back ([`BackMsg`] of [`GradPart`]s), the weights a
//! real block publishes to its EMA twins ([`EmaSnapshot`]), what stages tell the coordinator
//! ([`Event`], [`Failure`]), and a module's state as it starts and as a checkpoint takes it
//! ([`ModuleSnapshot`]). [`handoff`] lands each message on the receiving stage's device and
//! stream. Plain data: this layer imports nothing of the engine but its error type.
//!
//! ```text
//!             Forward::Train{id, h, targets}      (bounded: in_flight)
//! coordinator ─────────▶ stage 0 ─────────▶ stage 1 ─────────▶ … ─────────▶ stage D-1
//!     ▲                    ▲  ◀── BackMsg{id, parts, last} ──┘ (cascade gradients)
//!     │                    └── EmaSnapshot (real block weights → twins in earlier stages)
//!     └──────────── Event (metric windows, eval counts, drained, state, failed) ◀── every stage
//! ```

pub mod handoff;

pub use handoff::{Carries, Handed};

use crate::error::TrainError;
use mlaan_core::metrics::StageWindow;
use tch::Tensor;

/// A gradient with respect to the receiving module's output, and how many more modules it
/// may reach beyond the receiver.
#[derive(Debug)]
pub struct GradPart {
    pub reach_left: usize,
    pub grad: Tensor,
}

/// Gradient parts for the previous stage. `last` marks the final message for a batch.
#[derive(Debug)]
pub struct BackMsg {
    pub id: u64,
    pub parts: Vec<GradPart>,
    pub last: bool,
}

/// The labels and raw image that travel with a batch.
#[derive(Debug)]
pub struct BatchTargets {
    pub labels: Tensor,
    /// Un-normalised image as `u8` (InfoPro only).
    pub image_u8: Option<Tensor>,
}

impl BatchTargets {
    pub fn shallow_clone(&self) -> BatchTargets {
        BatchTargets {
            labels: self.labels.shallow_clone(),
            image_u8: self.image_u8.as_ref().map(Tensor::shallow_clone),
        }
    }
}

/// A weight snapshot of a real block, published after optimizer step `step`.
#[derive(Debug)]
pub struct EmaSnapshot {
    pub step: u64,
    pub params: Vec<Tensor>,
}

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

/// Named tensors of one module (its stores, EMA twins prefixed `ema.`).
pub type ModuleState = Vec<(String, Tensor)>;

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

    /// The same tensors, shared (each stage thread takes its modules' from one copy).
    pub fn shallow_clone(&self) -> Self {
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
    pub fn into_error(self) -> TrainError {
        TrainError::Stage {
            stage: self.stage,
            modules: self.modules,
            batch: self.batch,
            cause: Box::new(self.cause),
        }
    }
}

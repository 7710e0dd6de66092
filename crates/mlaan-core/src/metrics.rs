//! Metric records. Units are in the field names; every record is one JSON line in
//! `metrics.jsonl`.

use serde::{Deserialize, Serialize};

/// The compute phases of a module's work that [`StageWindow::phases_ms`] reports, in the
/// engine's order (`mlaan_engine::module::clock::Phase`).
pub const PHASES: [&str; 6] =
    ["forward", "terms", "backward_input", "backward_params", "optimizer", "ema"];

/// Per-stage counters over one logging window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageWindow {
    pub stage: usize,
    pub device: String,
    pub modules: Vec<usize>,
    pub batches: u64,
    pub images: u64,
    pub images_per_s: f64,
    /// Time spent computing.
    pub busy_ms: f64,
    /// Waiting for the next input (starved by the stage before).
    pub wait_input_ms: f64,
    /// Waiting for the next stage to accept output (back-pressure).
    pub wait_output_ms: f64,
    /// Waiting for cascade gradients or EMA snapshots of later stages.
    pub wait_grad_ms: f64,
    pub wall_ms: f64,
    /// Averaging gradients across data-parallel replicas (inside `busy_ms`).
    #[serde(default)]
    pub allreduce_ms: f64,
    /// Bytes this rank all-reduced (its buffers' sizes) over the window.
    #[serde(default)]
    pub allreduce_bytes: u64,
    /// Compute time by phase (forward, terms, backward_input, backward_params, optimizer,
    /// ema; inside `busy_ms`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub phases_ms: std::collections::BTreeMap<String, f64>,
    /// Batches queued at this stage's input when the window closed.
    pub queue_depth: usize,
    /// Batches between the newest forward and the batch whose cascade gradient was last
    /// applied (0 when there is none).
    pub grad_lag: u64,
    /// Bytes of tensors this stage owns right now (parameters, aux, LAM, EMA, optimizer
    /// state, stored inputs and graphs).
    pub live_bytes: u64,
    pub peak_live_bytes: u64,
    /// Optimizer steps its modules skipped for a loss-scale overflow (fp16) in the window.
    #[serde(default)]
    pub overflow_skips: u64,
    /// Mean of each module's local loss over the window.
    pub loss: Vec<f64>,
}

impl StageWindow {
    pub fn busy_fraction(&self) -> f64 {
        if self.wall_ms > 0.0 {
            self.busy_ms / self.wall_ms
        } else {
            0.0
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricRecord {
    /// A training window: global step, loss of the network's output, learning rate, rate.
    Train {
        step: u64,
        epoch: usize,
        loss: f64,
        lr: f64,
        images_per_s: f64,
        elapsed_s: f64,
        /// Batches dropped for a non-finite loss since step 0 of this process.
        #[serde(default, skip_serializing_if = "is_zero")]
        skipped_batches: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stages: Vec<StageWindow>,
    },
    /// An evaluation on the test set.
    Eval {
        step: u64,
        epoch: usize,
        test_accuracy: f64,
        test_loss: f64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        module_accuracy: Vec<Option<f64>>,
    },
}

impl MetricRecord {
    /// The global step the record was taken at.
    pub fn step(&self) -> u64 {
        match self {
            MetricRecord::Train { step, .. } | MetricRecord::Eval { step, .. } => *step,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

//! A module's fixed settings: its gradient routes (derived once, in `mlaan_core::routes`),
//! its optimizer and learning rate, and the run's switches that change how it works
//! (micro-batches per step, recompute, dropping batches, fp16 scaling).

use crate::optim::LrSchedule;
use mlaan_core::config::OptimConfig;
use mlaan_core::micro::MicroBatches;
use mlaan_core::plan::NetworkPlan;
use mlaan_core::routes::ModuleRoutes;

/// Static settings of a module.
pub struct ModuleSettings {
    pub lr: LrSchedule,
    pub optim: OptimConfig,
    /// Where its gradients go (`ModuleRoutes::of`).
    pub routes: ModuleRoutes,
    /// Batches per optimizer step, and their numbering.
    pub micro: MicroBatches,
    /// Forward without keeping the graph and rebuild it for the backward passes: one more
    /// forward per batch for a peak of max(module graph, term graphs) instead of their sum.
    pub recompute_graph: bool,
    pub ema_momentum: f64,
    /// Batches may be dropped after their forward (`on_nonfinite = "skip"`): keep the
    /// running statistics before each forward to put them back.
    pub may_drop: bool,
    /// Scale losses dynamically (fp16 compute).
    pub loss_scale: bool,
}

impl ModuleSettings {
    /// Settings of module `m` of `plan`: its routes come from the plan; one batch per step,
    /// graphs kept, and EMA twins equal to their source (momentum 0). Callers override the
    /// rest with struct-update syntax.
    pub fn for_module(plan: &NetworkPlan, m: usize, lr: LrSchedule, optim: OptimConfig) -> Self {
        ModuleSettings {
            lr,
            optim,
            routes: ModuleRoutes::of(plan, m),
            micro: MicroBatches::default(),
            recompute_graph: false,
            ema_momentum: 0.0,
            may_drop: false,
            loss_scale: false,
        }
    }
}

//! A stage: the consecutive modules that share one device and one worker thread, and what it
//! does with a batch. Within a stage, gradients between its modules are exact (same batch,
//! same weights); across stages they travel as messages.
//!
//! For batch b a stage runs:
//! 1. `process`: forward and local losses of every module, then an early backward sweep that
//!    carries each cascade gradient to the front of the stage; what leaves the front goes to
//!    the previous stage at once (so no stage waits on a chain of later stages);
//! 2. `receive` (sync): gradient parts of b from the next stage, swept to the front likewise;
//! 3. `finish`: the parameter pass of every module, and the optimizer steps;
//! 4. `late` (async): a part for an already finished batch, applied by recomputation.

use crate::module::{BatchTargets, GradPart, LocalModule};
use crate::TrainError;
use mlaan_core::plan::NetworkPlan;
use tch::{Device, Tensor};

/// Gradient parts for the previous stage. `last` marks the final message for a batch.
#[derive(Debug)]
pub struct BackMsg {
    pub id: u64,
    pub parts: Vec<GradPart>,
    pub last: bool,
}

/// Which messages a stage sends and expects, derived once from the plan.
#[derive(Debug, Clone, Copy)]
pub struct StageRoutes {
    /// The previous stage expects gradient messages from this one.
    pub prev_expects: bool,
    /// This stage expects gradient messages from the next one.
    pub expects_next: bool,
    /// Parts from the next stage can travel through this stage to the previous one.
    pub next_passes_through: bool,
}

impl StageRoutes {
    pub fn new(plan: &NetworkPlan, modules: std::ops::Range<usize>) -> Self {
        let (a, b) = (modules.start, modules.end);
        let incoming = plan.incoming_reach_left(b - 1, b);
        StageRoutes {
            prev_expects: a > 0 && plan.incoming_reach_left(a - 1, a).is_some(),
            expects_next: incoming.is_some(),
            next_passes_through: a > 0 && incoming.is_some_and(|r| r >= b - a),
        }
    }
}

/// The modules of one stage.
pub struct Stage {
    pub modules: Vec<LocalModule>,
    pub routes: StageRoutes,
    /// Per module: whether late parts can reach it (async keeps its inputs).
    keeps_input: Vec<bool>,
    pub device: Device,
    /// Highest live bytes seen since the last `take_peak`, probed after every module call.
    peak: u64,
}

impl Stage {
    pub fn new(plan: &NetworkPlan, modules: Vec<LocalModule>, device: Device) -> Self {
        let a = modules[0].index;
        let b = a + modules.len();
        let keeps_input = (a..b).map(|m| plan.incoming_reach_left(m, b).is_some()).collect();
        Stage { routes: StageRoutes::new(plan, a..b), modules, keeps_input, device, peak: 0 }
    }

    pub fn first_module(&self) -> usize {
        self.modules[0].index
    }

    /// Forward and local losses of every module, and the early backward sweep. Returns the
    /// stage output and the message for the previous stage, if any.
    pub fn process(
        &mut self,
        id: u64,
        x: &Tensor,
        targets: &BatchTargets,
    ) -> Result<(Tensor, Option<BackMsg>), TrainError> {
        let mut h = x.shallow_clone();
        for i in 0..self.modules.len() {
            let t = BatchTargets {
                labels: targets.labels.shallow_clone(),
                image_u8: targets.image_u8.as_ref().map(|t| t.shallow_clone()),
            };
            h = self.modules[i].forward(id, &h, t)?;
            self.modules[i].local_losses(id)?;
            self.probe(i);
        }
        let front = self.sweep(id, Vec::new())?;
        let early = (!front.is_empty()).then(|| BackMsg {
            id,
            parts: front,
            last: !self.routes.next_passes_through,
        });
        Ok((h, early))
    }

    /// Carry `incoming` (parts on the stage output) and every unsent part backward through the
    /// stage; returns the parts leaving its front.
    fn sweep(&mut self, id: u64, incoming: Vec<GradPart>) -> Result<Vec<GradPart>, TrainError> {
        let mut parts = incoming;
        for i in (0..self.modules.len()).rev() {
            self.modules[i].add_grads(id, std::mem::take(&mut parts))?;
            parts = self.modules[i].propagate(id)?;
            self.probe(i);
        }
        Ok(parts)
    }

    /// Parts of batch `id` from the next stage (sync); returns those leaving the front.
    pub fn receive(&mut self, id: u64, parts: Vec<GradPart>) -> Result<Vec<GradPart>, TrainError> {
        self.sweep(id, parts)
    }

    /// Parameter passes and optimizer steps for batch `id`. `keep_inputs` (async) stores the
    /// inputs that late gradients will need. Later modules step first: they publish the
    /// weights that earlier modules' EMA twins fold in after the same step.
    pub fn finish(&mut self, id: u64, keep_inputs: bool) -> Result<(), TrainError> {
        for i in (0..self.modules.len()).rev() {
            self.modules[i].finish(id, keep_inputs && self.keeps_input[i])?;
            self.probe(i);
        }
        Ok(())
    }

    /// A late message from the next stage for a finished batch (async). Returns the parts for
    /// the previous stage.
    pub fn late(
        &mut self,
        id: u64,
        parts: Vec<GradPart>,
        last: bool,
    ) -> Result<Vec<GradPart>, TrainError> {
        let mut parts = parts;
        for i in (0..self.modules.len()).rev() {
            if !self.keeps_input[i] {
                break;
            }
            if parts.is_empty() {
                if last {
                    self.modules[i].release(id);
                }
                continue;
            }
            parts = self.modules[i].apply_late(id, std::mem::take(&mut parts), last)?;
            self.probe(i);
        }
        Ok(parts)
    }

    /// Batches whose inputs are still stored for late gradients.
    /// Whether an async step stores inputs for late gradients (some module receives them).
    pub fn stores_inputs(&self) -> bool {
        self.keeps_input.iter().any(|&k| k)
    }

    pub fn outstanding(&self) -> usize {
        self.modules.iter().map(|m| m.stored_count()).max().unwrap_or(0)
    }

    pub fn live_bytes(&self) -> u64 {
        self.modules.iter().map(|m| m.live_bytes()).sum()
    }

    /// After a call on module `i`: what the stage holds now plus what the call held and
    /// freed, so the peak counts graphs that live only inside one call.
    fn probe(&mut self, i: usize) {
        let transient = self.modules[i].take_call_transient();
        self.peak = self.peak.max(self.live_bytes() + transient);
    }

    /// Highest live bytes since the last call (at least what is live now); resets.
    pub fn take_peak(&mut self) -> u64 {
        let now = self.live_bytes();
        std::mem::replace(&mut self.peak, 0).max(now)
    }
}

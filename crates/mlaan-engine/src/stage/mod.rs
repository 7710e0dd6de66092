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
//!
//! Which of these leave a message for the previous stage, and when it is the batch's last, is
//! [`StageRoutes::back_message`]'s one rule.

use crate::module::{BatchTargets, GradPart, LocalModule};
use crate::TrainError;
use mlaan_core::config::OnNonFinite;
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

    /// The message for the previous stage once batch `id`'s parts `front` have left this
    /// stage's front: after the early sweep (`after_next = None`) or after a message from the
    /// next stage (`Some(last)`, its `last` flag). A previous stage that expects gradients
    /// gets exactly one message marked `last` per batch: from the early sweep when nothing
    /// from later stages can pass through, else with the next stage's last one.
    pub fn back_message(
        &self,
        id: u64,
        front: Vec<GradPart>,
        after_next: Option<bool>,
    ) -> Option<BackMsg> {
        if !self.prev_expects {
            return None;
        }
        let last = match after_next {
            None => !self.next_passes_through,
            Some(last) => self.next_passes_through && last,
        };
        (last || !front.is_empty()).then_some(BackMsg { id, parts: front, last })
    }
}

/// What [`Stage::process`] did with a batch.
pub struct Processed {
    /// The stage output, or why the batch was dropped here (a non-finite loss under
    /// `on_nonfinite = "skip"`).
    pub output: Result<Tensor, TrainError>,
    /// Parts that left the stage's front in the early sweep.
    pub front: Vec<GradPart>,
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

    /// Forward and local losses of every module, and the early backward sweep. A non-finite
    /// loss fails the stage, or under `OnNonFinite::Skip` drops the batch from that module on:
    /// the modules before it keep their (finite) local update, the others never train on it.
    pub fn process(
        &mut self,
        id: u64,
        x: &Tensor,
        targets: &BatchTargets,
        on_nonfinite: OnNonFinite,
    ) -> Result<Processed, TrainError> {
        let inputs = [Some(x), Some(&targets.labels), targets.image_u8.as_ref()];
        self.check_device(id, "input", inputs.into_iter().flatten())?;
        let mut h: Result<Tensor, TrainError> = Ok(x.shallow_clone());
        for i in 0..self.modules.len() {
            let Ok(input) = &h else {
                self.modules[i].drop_batch(id)?;
                continue;
            };
            let out = self.modules[i].forward(id, input, targets.shallow_clone())?;
            h = match self.modules[i].local_losses(id) {
                Ok(_) => Ok(out),
                Err(e @ TrainError::NonFinite { .. }) if on_nonfinite == OnNonFinite::Skip => {
                    self.modules[i].drop_batch(id)?;
                    Err(e)
                }
                Err(e) => return Err(e),
            };
            self.probe(i);
        }
        let front = self.sweep(id, Vec::new())?;
        Ok(Processed { output: h, front })
    }

    /// Batch `id` was dropped by an earlier stage: every module here drops it too.
    pub fn drop_batch(&mut self, id: u64) -> Result<(), TrainError> {
        self.modules.iter_mut().try_for_each(|m| m.drop_batch(id))
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
        self.check_device(id, "gradient part", parts.iter().map(|p| &p.grad))?;
        self.sweep(id, parts)
    }

    /// Every tensor a stage's modules compute with is on the stage's device (the hand-off
    /// puts it there); anything else is a protocol error naming the stage and the batch,
    /// rather than a kernel failing on mixed devices somewhere inside a module.
    fn check_device<'a>(
        &self,
        id: u64,
        what: &str,
        tensors: impl IntoIterator<Item = &'a Tensor>,
    ) -> Result<(), TrainError> {
        match tensors.into_iter().find(|t| t.defined() && t.device() != self.device) {
            None => Ok(()),
            Some(t) => Err(TrainError::Protocol(format!(
                "the stage of modules {}.. on {:?} got batch {id}'s {what} on {:?}",
                self.first_module(),
                self.device,
                t.device()
            ))),
        }
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
        self.check_device(id, "late gradient part", parts.iter().map(|p| &p.grad))?;
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

    /// Whether an async step stores inputs for late gradients (some module receives them).
    pub fn stores_inputs(&self) -> bool {
        self.keeps_input.iter().any(|&k| k)
    }

    /// Batches whose inputs are still stored for late gradients.
    pub fn outstanding(&self) -> usize {
        self.modules.iter().map(|m| m.stored_count()).max().unwrap_or(0)
    }

    pub fn live_bytes(&self) -> u64 {
        self.modules.iter().map(|m| m.live_bytes()).sum()
    }

    /// Time spent per phase so far, over the stage's modules.
    pub fn phase_times(&self) -> crate::module::clock::PhaseTimes {
        self.modules.iter().fold(Default::default(), |a, m| a.plus(&m.phase_times()))
    }

    /// Steps its modules skipped for a loss-scale overflow so far (fp16).
    pub fn overflow_skips(&self) -> u64 {
        self.modules.iter().map(|m| m.overflow_skips()).sum()
    }

    /// Gradient averaging across replicas so far, over the stage's modules.
    pub fn replica_traffic(&self) -> crate::module::Traffic {
        self.modules.iter().map(|m| m.replica_traffic()).fold(Default::default(), |a, b| a + b)
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

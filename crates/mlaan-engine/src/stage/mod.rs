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
//! the routes' one rule (`mlaan_core::routes::StageRoutes::back`). The stage also owns its
//! input preparation ([`input`]), its evaluation counts ([`eval`]) and its memory count
//! ([`memory`]).

pub mod eval;
pub mod input;
pub mod memory;

use crate::error::TrainError;
use crate::module::clock::PhaseTimes;
use crate::module::{LocalModule, Traffic};
use crate::wire::{BackMsg, BatchTargets, EmaSnapshot, GradPart, Handed, ModuleEval};
use crossbeam_channel::Receiver;
use input::InputPrep;
use memory::StageMemory;
use mlaan_core::config::OnNonFinite;
use mlaan_core::plan::NetworkPlan;
use mlaan_core::routes::StageRoutes;
use tch::{Device, Tensor};

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
    pub device: Device,
    /// Stage 0 prepares the raw images it receives; later stages take activations as they are.
    input: Option<InputPrep>,
    pub memory: StageMemory,
    eval: Vec<ModuleEval>,
}

impl Stage {
    /// The stage of `modules` (consecutive) on `device`; `input` for the stage holding module 0.
    pub fn new(
        plan: &NetworkPlan,
        modules: Vec<LocalModule>,
        device: Device,
        input: Option<InputPrep>,
    ) -> Self {
        let a = modules[0].index;
        let routes = StageRoutes::of(plan, a..a + modules.len());
        Stage { routes, modules, device, input, memory: StageMemory::default(), eval: Vec::new() }
    }

    pub fn first_module(&self) -> usize {
        self.modules[0].index
    }

    /// A batch as the first module takes it: prepared on stage 0, as received elsewhere.
    fn prepare(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        match &self.input {
            Some(prep) => prep.apply(x),
            None => Ok(x.shallow_clone()),
        }
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
        self.memory.queued.remove(crate::bytes_of(x));
        let mut h: Result<Tensor, TrainError> = self.prepare(x);
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

    /// One evaluation batch as it arrived: its bytes off the queue, prepared, counted; the
    /// stage's output for the next stage. Call under `no_grad`.
    pub fn eval_batch(&mut self, x: &Tensor, labels: &Tensor) -> Result<Tensor, TrainError> {
        self.check_device(0, "evaluation input", [x, labels])?;
        self.memory.queued.remove(crate::bytes_of(x));
        let x = self.prepare(x)?;
        Ok(self.evaluate(&x, labels))
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

    /// Parameter passes and optimizer steps for batch `id`. `keep_inputs` (async) stores the
    /// inputs that late gradients will need. Later modules step first: they publish the
    /// weights that earlier modules' EMA twins fold in after the same step.
    pub fn finish(&mut self, id: u64, keep_inputs: bool) -> Result<(), TrainError> {
        for i in (0..self.modules.len()).rev() {
            self.modules[i].finish(id, keep_inputs && self.routes.keeps_input[i])?;
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
            if !self.routes.keeps_input[i] {
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

    /// The message for the previous stage once batch `id`'s parts `front` have left this
    /// stage's front: after the early sweep (`after_next = None`) or after a message from the
    /// next stage (`Some(last)`); `None` when none is due (`StageRoutes::back`).
    pub fn back_message(
        &self,
        id: u64,
        front: Vec<GradPart>,
        after_next: Option<bool>,
    ) -> Option<BackMsg> {
        let last = self.routes.back(!front.is_empty(), after_next)?;
        Some(BackMsg { id, parts: front, last })
    }

    /// A twin of one of the stage's modules waiting for an exact snapshot from a later stage:
    /// (module position, twin, the channel it comes on).
    pub fn awaited_ema(&self) -> Option<(usize, usize, Receiver<Handed<EmaSnapshot>>)> {
        self.modules
            .iter()
            .enumerate()
            .find_map(|(i, m)| m.ema.awaited().map(|(twin, rx)| (i, twin, rx.clone())))
    }

    /// Hand the snapshot a twin waited for to its module.
    pub fn deliver_ema(
        &mut self,
        module: usize,
        twin: usize,
        snap: EmaSnapshot,
    ) -> Result<(), TrainError> {
        self.modules[module].ema.deliver(twin, snap)
    }

    /// Every module's mean loss per term since the last call (a metrics window's).
    pub fn take_term_losses(&mut self) -> Vec<(usize, Vec<f64>)> {
        self.modules.iter_mut().map(|m| (m.index, m.take_term_losses())).collect()
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

    /// Batches whose inputs are still stored for late gradients.
    pub fn outstanding(&self) -> usize {
        self.modules.iter().map(|m| m.stored_count()).max().unwrap_or(0)
    }

    /// Bytes the stage holds now: its modules' and the batches queued for it.
    pub fn live_bytes(&self) -> u64 {
        self.modules_bytes() + self.memory.queued.get()
    }

    fn modules_bytes(&self) -> u64 {
        self.modules.iter().map(|m| m.live_bytes()).sum()
    }

    /// Fold the peaks probed since the last call into the window's and the run's.
    pub fn note_peak(&mut self) {
        let now = self.modules_bytes();
        self.memory.note(now);
    }

    /// Time spent per phase so far, over the stage's modules.
    pub fn phase_times(&self) -> PhaseTimes {
        self.modules.iter().fold(Default::default(), |a, m| a.plus(&m.phase_times()))
    }

    /// Steps its modules skipped for a loss-scale overflow so far (fp16).
    pub fn overflow_skips(&self) -> u64 {
        self.modules.iter().map(|m| m.overflow_skips()).sum()
    }

    /// The first failure of a module's replica group underneath it (an aborted NCCL
    /// communicator), which explains an error the stage met better than the error itself.
    pub fn replica_failure(&self) -> Option<TrainError> {
        self.modules.iter().find_map(LocalModule::replica_failure)
    }

    /// Gradient averaging across replicas so far, over the stage's modules.
    pub fn replica_traffic(&self) -> Traffic {
        self.modules.iter().map(|m| m.replica_traffic()).fold(Default::default(), |a, b| a + b)
    }

    /// After a call on module `i`: what the stage holds now plus what the call held and
    /// freed, so the peak counts graphs that live only inside one call.
    fn probe(&mut self, i: usize) {
        let transient = self.modules[i].take_call_transient();
        let held = self.modules_bytes() + transient;
        self.memory.probe(held);
    }
}

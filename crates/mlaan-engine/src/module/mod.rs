//! One local module at work: its networks, optimizer, gradient accumulators, the graphs of the
//! batches it is processing, and its EMA twins. Every schedule drives modules through the same
//! five operations, so the arithmetic is shared and only the order differs:
//!
//! ```text
//! forward(b)      h = M_i(x)                     keep x, h and the graph of batch b
//! local_losses(b) each term: loss, ∂loss/∂h      grads of term nets accumulate; ∂/∂h kept by reach
//! add_grads(b,·)  parts ∂L/∂h from later modules  kept by remaining reach
//! propagate(b)    for reach ≥ 1: ∂L/∂x = J_xᵀ g  returned as parts for module i−1 (reach − 1)
//! finish(b)       θ_i += J_θᵀ Σg; step when the batch closes its optimizer step
//! ```
//!
//! A gradient part carries its remaining reach, so a cascade loss reaches exactly
//! modules i−d+1..i (docs/method.md §4) and nothing earlier.
//!
//! This file is the five operations (and a late gradient's replay of them). The rest lives by
//! concern: [`settings`] (routes and switches), [`step`] (all-reduce → loss scale → SGD →
//! EMA), [`state`] (save and restore, one symmetric pair), [`stats`] (per-term losses),
//! [`loss_scale`] (fp16), [`rollback`] (batch-norm statistics of a dropped batch),
//! [`replicas`], and the bookkeeping of [`grads`], [`in_flight`], [`ema`], [`meter`] and
//! [`clock`]. A batch whose loss is not finite can be dropped ([`LocalModule::drop_batch`]):
//! later calls on it do nothing, and it still counts for its step, so step counts stay
//! aligned across modules.

pub mod buckets;
pub mod clock;
pub mod ema;
pub mod grads;
pub mod in_flight;
pub mod loss_scale;
pub mod meter;
pub mod replicas;
pub mod rollback;
pub mod settings;
pub mod state;
pub mod stats;
pub mod step;

pub use ema::{EmaLag, EmaLinks, SourceLink, TwinLink};
pub use replicas::{ReplicaSync, Replicas, Traffic};
pub use settings::ModuleSettings;
pub use stats::TermStats;

use crate::bytes_of;
use crate::error::TrainError;
use crate::optim::{LrSchedule, Sgd};
use crate::wire::{BatchTargets, GradPart};
use clock::{Phase, PhaseTimes};
use grads::{vjp, GradBook};
use in_flight::{Entry, InFlight, Kept, Pending};
use loss_scale::{scaled, unscaled, LossScale};
use meter::MemoryMeter;
use mlaan_core::micro::MicroBatches;
use mlaan_core::plan::TermKind;
use mlaan_core::routes::ModuleRoutes;
use mlaan_models::layers::{count_saved, Mode};
use mlaan_models::losses;
use mlaan_models::module::{LocalNets, Targets};
use rollback::RunningStats;
use std::time::Instant;
use tch::{Kind, Tensor};

/// One module and everything it owns.
pub struct LocalModule {
    pub nets: LocalNets,
    pub index: usize,
    opt: Sgd,
    lr: LrSchedule,
    grads: GradBook,
    batches: InFlight,
    pub ema: EmaLinks,
    meter: MemoryMeter,
    routes: ModuleRoutes,
    /// Forward without the graph, rebuild it for the backward passes.
    recompute: bool,
    micro: MicroBatches,
    /// Present when batches may be dropped (`on_nonfinite = "skip"`).
    running: Option<RunningStats>,
    /// This module's group across data-parallel replicas, when there are several.
    replicas: Option<ReplicaSync>,
    /// The dynamic loss scale under fp16.
    scaler: Option<LossScale>,
    /// Time spent per phase so far.
    clock: PhaseTimes,
    /// Optimizer steps taken (positions the learning-rate schedule).
    pub step: u64,
    stats: Vec<TermStats>,
}

impl LocalModule {
    pub fn new(nets: LocalNets, s: ModuleSettings) -> Self {
        let params = nets.named_trainable(|_| true);
        let grads = GradBook::new(&nets, &params);
        let fixed = nets.state().iter().map(|(_, t)| bytes_of(t)).sum();
        LocalModule {
            index: nets.index,
            opt: Sgd::new(params, &s.optim),
            lr: s.lr,
            grads,
            batches: InFlight::default(),
            ema: EmaLinks::new(nets.index, s.ema_momentum),
            meter: MemoryMeter::new(fixed),
            routes: s.routes,
            recompute: s.recompute_graph,
            micro: s.micro,
            running: s.may_drop.then(|| RunningStats::of(&nets)),
            replicas: None,
            scaler: s.loss_scale.then(LossScale::default),
            clock: PhaseTimes::default(),
            step: 0,
            stats: vec![TermStats::default(); nets.terms.len()],
            nets,
        }
    }

    /// h_i = M_i(x) in training mode; keeps what the later operations need.
    pub fn forward(
        &mut self,
        id: u64,
        x: &Tensor,
        targets: BatchTargets,
    ) -> Result<Tensor, TrainError> {
        self.timed(Phase::Forward, |m| m.forward_keeping(id, x, targets))
    }

    fn forward_keeping(
        &mut self,
        id: u64,
        x: &Tensor,
        targets: BatchTargets,
    ) -> Result<Tensor, TrainError> {
        let x = self.graph_input(x);
        let stats_before = self.running.as_ref().map(RunningStats::copy);
        let (h, graph_bytes) = if self.recompute {
            // Keep only the input: the graph is rebuilt when the gradients are known, so the
            // module's graph and its terms' graphs are never alive together.
            (tch::no_grad(|| self.nets.forward(&x, Mode::Train)), 0)
        } else {
            count_saved(|| self.nets.forward(&x, Mode::Train))
        };
        let out = h.detach();
        let mut p = Pending::new(x, h, targets, graph_bytes, !self.recompute);
        p.stats_before = stats_before;
        self.batches.begin(id, p);
        Ok(out)
    }

    /// Every term's loss on h: term networks get their gradients, ∂loss/∂h is kept by reach.
    /// Returns the unweighted losses. A non-finite loss fails before anything is accumulated:
    /// the batch can then be dropped and leaves no trace.
    pub fn local_losses(&mut self, id: u64) -> Result<Vec<f64>, TrainError> {
        self.timed(Phase::Terms, |m| m.term_losses(id))
    }

    fn term_losses(&mut self, id: u64) -> Result<Vec<f64>, TrainError> {
        let p = self.live(id, "local losses of")?;
        let hd = p.h.detach().set_requires_grad(true);
        let image = p.targets.image_u8.as_ref().map(|t| t.to_kind(Kind::Float) / 255.0);
        let labels = p.targets.labels.shallow_clone();
        let (mut losses, mut parts, mut term_grads, mut stats) =
            (Vec::new(), Vec::new(), Vec::new(), self.stats.clone());
        for (t, st) in stats.iter_mut().enumerate() {
            let spec = &self.nets.terms[t].spec;
            let (weight, reach, kind) = (spec.weight, spec.reach, spec.kind);
            let targets = Targets { labels: &labels, image: image.as_ref() };
            let (out, bytes) = count_saved(|| self.nets.term_loss(t, &hd, &targets, Mode::Train));
            self.meter.note_transient(bytes);
            let loss = out.loss.f_double_value(&[])?;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite {
                    module: self.index,
                    batch: id,
                    what: format!("{kind:?} loss = {loss}"),
                });
            }
            st.loss_sum += loss;
            st.batches += 1;
            if let Some(l) = &out.logits {
                st.correct += losses::correct(l, &labels);
                st.seen += labels.size()[0];
            }
            losses.push(loss);
            let params = &self.grads.terms[t];
            let mut inputs: Vec<&Tensor> = vec![&hd];
            inputs.extend(params.iter().map(|(_, p)| p));
            let scale = self.scaler.as_ref().map_or(1.0, LossScale::value);
            let grads =
                Tensor::f_run_backward(&[out.loss * (weight * scale)], &inputs, false, false)?;
            for ((slot, _), g) in params.iter().zip(&grads[1..]) {
                if g.defined() {
                    term_grads.push((*slot, unscaled(&self.scaler, g)));
                }
            }
            if grads[0].defined() {
                parts.push(GradPart { reach_left: reach, grad: unscaled(&self.scaler, &grads[0]) });
            }
        }
        self.grads.add_slotted(term_grads)?;
        self.stats = stats;
        self.add_grads(id, parts)?;
        Ok(losses)
    }

    /// Gradient parts on h of batch `id` from later modules (or from this module's terms).
    pub fn add_grads(&mut self, id: u64, parts: Vec<GradPart>) -> Result<(), TrainError> {
        let input_grad = self.routes.input_grad;
        match self.entry_mut(id, "gradient for")? {
            Entry::Live(p) => p.add(parts, input_grad),
            Entry::Dropped => Ok(()),
        }
    }

    /// Rebuild the graph of a batch forwarded without one (recompute mode): the same values,
    /// batch statistics untouched.
    fn ensure_graph(&mut self, id: u64) -> Result<(), TrainError> {
        self.timed(Phase::Forward, |m| m.rebuild_graph(id))
    }

    fn rebuild_graph(&mut self, id: u64) -> Result<(), TrainError> {
        let nets = &self.nets;
        let Some(Entry::Live(p)) = self.batches.entry_mut(id) else { return Ok(()) };
        if !p.has_graph {
            let (h, bytes) = count_saved(|| nets.forward(&p.x, Mode::Recompute));
            p.h = h;
            p.graph_bytes = bytes;
            p.has_graph = true;
        }
        Ok(())
    }

    /// A detached copy of `x` that the graph starts from: requiring a gradient when one
    /// must go back to module i−1.
    fn graph_input(&self, x: &Tensor) -> Tensor {
        if self.routes.input_grad {
            x.detach().set_requires_grad(true)
        } else {
            x.detach()
        }
    }

    /// ∂L/∂x for every part that reaches further back, as parts for module i−1.
    pub fn propagate(&mut self, id: u64) -> Result<Vec<GradPart>, TrainError> {
        let unsent_any =
            matches!(self.entry(id, "propagate")?, Entry::Live(p) if !p.g_unsent.is_empty());
        if !unsent_any {
            return Ok(Vec::new());
        }
        self.ensure_graph(id)?;
        self.timed(Phase::BackwardInput, |m| m.send_back(id))
    }

    /// The backward passes of `propagate`, on a batch with unsent parts and its graph.
    fn send_back(&mut self, id: u64) -> Result<Vec<GradPart>, TrainError> {
        let combined = self.routes.all_continue && !self.grads.backbone.is_empty();
        let Some(Entry::Live(p)) = self.batches.entry_mut(id) else { unreachable!("checked") };
        let unsent = p.take_unsent()?;
        let mut out = Vec::with_capacity(unsent.len());
        for (reach, g) in unsent {
            let mut inputs: Vec<&Tensor> = vec![&p.x];
            if combined {
                inputs.extend(self.grads.backbone.iter().map(|(_, t)| t));
            }
            let grads = vjp(&p.h, &scaled(&self.scaler, &g), &inputs, true)?;
            let mut grads = grads.iter().map(|g| unscaled(&self.scaler, g));
            let to_input = grads.next().expect("one gradient per input");
            out.push(GradPart { reach_left: reach - 1, grad: to_input });
            self.grads.add_backbone(grads)?;
        }
        if combined {
            // Every part went back with its parameter gradient: nothing left for `finish`.
            p.param_parts.clear();
        }
        Ok(out)
    }

    /// The parameter pass of batch `id`; steps when `id` closes its optimizer step. With
    /// `keep_input`, the input is kept for late gradients (async).
    pub fn finish(&mut self, id: u64, keep_input: bool) -> Result<(), TrainError> {
        if matches!(self.entry(id, "finish")?, Entry::Live(p) if !p.param_parts.is_empty()) {
            self.ensure_graph(id)?;
        }
        match self.batches.take(id).expect("checked above") {
            Entry::Live(p) => {
                if let Some(g) = p.param_grad()? {
                    self.param_pass(&p.h, &g)?;
                }
                self.meter.note_transient(p.bytes());
                if keep_input {
                    self.batches.keep(id, Kept::Input(p.x.detach(), p.targets));
                }
            }
            Entry::Dropped if keep_input => self.batches.keep(id, Kept::Dropped),
            Entry::Dropped => {}
        }
        if self.micro.closes_step(id) {
            self.step_now()?;
        }
        Ok(())
    }

    fn param_pass(&mut self, h: &Tensor, g: &Tensor) -> Result<(), TrainError> {
        if self.grads.backbone.is_empty() || !h.requires_grad() {
            return Ok(());
        }
        self.timed(Phase::BackwardParams, |m| {
            let inputs: Vec<&Tensor> = m.grads.backbone.iter().map(|(_, t)| t).collect();
            let grads = vjp(h, &scaled(&m.scaler, g), &inputs, false)?;
            m.grads.add_backbone(grads.iter().map(|g| unscaled(&m.scaler, g)))
        })
    }

    /// A late gradient for a finished batch (async): recompute the module on the kept input
    /// under the current weights (batch-norm statistics untouched), add its parameter
    /// gradient to the next step, and return the parts that reach further back. `last` drops
    /// the kept input.
    pub fn apply_late(
        &mut self,
        id: u64,
        parts: Vec<GradPart>,
        last: bool,
    ) -> Result<Vec<GradPart>, TrainError> {
        let (x0, targets) = match self.batches.take_kept(id) {
            Some(Kept::Input(x, t)) => (x, t),
            Some(Kept::Dropped) => {
                if !last {
                    self.batches.keep(id, Kept::Dropped);
                }
                return Ok(Vec::new());
            }
            None => return Err(self.unknown("late gradient for", id)),
        };
        let x = self.graph_input(&x0);
        let (h, graph_bytes) =
            self.timed(Phase::Forward, |m| count_saved(|| m.nets.forward(&x, Mode::Recompute)));
        let no_targets = BatchTargets { labels: Tensor::new(), image_u8: None };
        self.batches.begin(id, Pending::new(x, h, no_targets, graph_bytes, true));
        self.add_grads(id, parts)?;
        let back = self.propagate(id)?;
        let Some(Entry::Live(p)) = self.batches.take(id) else { unreachable!("begun above") };
        if let Some(g) = p.param_grad()? {
            self.param_pass(&p.h, &g)?;
        }
        self.meter.note_transient(p.bytes());
        if !last {
            self.batches.keep(id, Kept::Input(x0, targets));
        }
        Ok(back)
    }

    /// Drop batch `id` (a non-finite loss here or in an earlier module): whatever this module
    /// holds of it is freed, running statistics its forward moved are put back, gradients for
    /// it are ignored, and `finish` only counts it.
    pub fn drop_batch(&mut self, id: u64) -> Result<(), TrainError> {
        if let Some(Entry::Live(p)) = self.batches.take(id) {
            if let (Some(running), Some(saved)) = (&self.running, &p.stats_before) {
                running.restore(saved)?;
            }
        }
        self.batches.drop_batch(id);
        Ok(())
    }

    /// Drop a kept input whose last gradient part has arrived (or that will get none).
    pub fn release(&mut self, id: u64) {
        self.batches.take_kept(id);
    }

    /// Batches whose inputs are kept for late gradients (tombstones included).
    pub fn stored_count(&self) -> usize {
        self.batches.kept_count()
    }

    pub fn pending_count(&self) -> usize {
        self.batches.pending_count()
    }

    /// Run `f`, adding its wall time to `phase`.
    fn timed<T>(&mut self, phase: Phase, f: impl FnOnce(&mut Self) -> T) -> T {
        let start = Instant::now();
        let out = f(self);
        self.clock.add(phase, start.elapsed());
        out
    }

    /// Time spent per phase so far.
    pub fn phase_times(&self) -> PhaseTimes {
        self.clock
    }

    /// Every term's mean loss since the last call (NaN for a term without a batch); the sums
    /// start again (a metrics window's term losses).
    pub fn take_term_losses(&mut self) -> Vec<f64> {
        stats::take_means(&mut self.stats)
    }

    fn entry(&self, id: u64, what: &str) -> Result<&Entry, TrainError> {
        self.batches.entry(id).ok_or_else(|| self.unknown(what, id))
    }

    fn entry_mut(&mut self, id: u64, what: &str) -> Result<&mut Entry, TrainError> {
        let index = self.index;
        self.batches.entry_mut(id).ok_or_else(|| unknown(index, what, id))
    }

    fn live(&self, id: u64, what: &str) -> Result<&Pending, TrainError> {
        match self.entry(id, what)? {
            Entry::Live(p) => Ok(p),
            Entry::Dropped => Err(TrainError::Protocol(format!(
                "module {}: {what} dropped batch {id}",
                self.index
            ))),
        }
    }

    fn unknown(&self, what: &str, id: u64) -> TrainError {
        unknown(self.index, what, id)
    }

    /// Whether the module has a term of this kind.
    pub fn has_term(&self, kind: TermKind) -> bool {
        self.nets.terms.iter().any(|t| t.spec.kind == kind)
    }

    /// The module's optimizer; its momentum buffers go into checkpoints.
    pub fn optimizer(&self) -> &Sgd {
        &self.opt
    }

    pub fn optimizer_mut(&mut self) -> &mut Sgd {
        &mut self.opt
    }

    #[doc(hidden)]
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.grads.slot_of(name)
    }

    /// Accumulated gradient of every trainable parameter (tests compare them).
    pub fn accumulated_grads(&self) -> Vec<(String, Option<Tensor>)> {
        self.opt
            .params
            .iter()
            .zip(self.grads.accumulated())
            .map(|((n, _), g)| (n.clone(), g.as_ref().map(|t| t.shallow_clone())))
            .collect()
    }
}

fn unknown(module: usize, what: &str, id: u64) -> TrainError {
    TrainError::Protocol(format!("module {module}: {what} unknown batch {id}"))
}

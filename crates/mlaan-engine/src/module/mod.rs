//! One local module at work: its networks, optimizer, gradient accumulators, the graphs of the
//! batches it is processing, and its EMA twins. Every schedule drives modules through the same
//! five operations, so the arithmetic is shared and only the order differs:
//!
//! ```text
//! forward(b)      h = M_i(x)                     keep x, h and the graph of batch b
//! local_losses(b) each term: loss, ∂loss/∂h      grads of term nets accumulate; ∂/∂h kept by reach
//! add_grads(b,·)  parts ∂L/∂h from later modules  kept by remaining reach
//! propagate(b)    for reach ≥ 1: ∂L/∂x = J_xᵀ g  returned as parts for module i−1 (reach − 1)
//! finish(b)       θ_i += J_θᵀ Σg; step when the accumulation group is complete
//! ```
//!
//! A gradient part carries its remaining reach, so a cascade loss reaches exactly
//! modules i−d+1..i (docs/method.md §4) and nothing earlier.
//!
//! The module's state lives by concern: gradient accumulators ([`grads`]), the batches in
//! progress and the inputs kept for late gradients ([`in_flight`]), EMA publishing and
//! folding ([`ema`], never blocking) and the memory meter ([`meter`]). A batch whose loss is
//! not finite can be dropped ([`LocalModule::drop_batch`]): later calls on it do nothing, and
//! it still counts in its accumulation group, so step counts stay aligned across modules.

pub mod clock;
pub mod ema;
pub mod grads;
pub mod in_flight;
pub mod loss_scale;
pub mod meter;
pub mod replicas;

pub use ema::{EmaLag, EmaLinks, EmaSnapshot, SourceLink, TwinLink};
pub use replicas::{ReplicaSync, Replicas, Traffic};

use crate::optim::{LrSchedule, Sgd};
use crate::{bytes_of, TrainError};
use clock::{Phase, PhaseTimes};
use grads::{vjp, GradBook};
use in_flight::{Entry, InFlight, Kept, Pending};
use loss_scale::LossScale;
use meter::MemoryMeter;
use mlaan_core::plan::TermKind;
use mlaan_models::layers::{count_saved, Mode};
use mlaan_models::losses;
use mlaan_models::module::{LocalNets, Targets};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A gradient with respect to the receiving module's output, and how many more modules it
/// may reach beyond the receiver.
#[derive(Debug)]
pub struct GradPart {
    pub reach_left: usize,
    pub grad: Tensor,
}

/// The labels and raw image that travel with a batch.
#[derive(Debug)]
pub struct BatchTargets {
    pub labels: Tensor,
    /// Un-normalised image as `u8` (InfoPro only).
    pub image_u8: Option<Tensor>,
}

impl BatchTargets {
    pub fn to_device(&self, device: Device) -> BatchTargets {
        BatchTargets {
            labels: self.labels.to_device(device),
            image_u8: self.image_u8.as_ref().map(|t| t.to_device(device)),
        }
    }

    pub fn shallow_clone(&self) -> BatchTargets {
        BatchTargets {
            labels: self.labels.shallow_clone(),
            image_u8: self.image_u8.as_ref().map(Tensor::shallow_clone),
        }
    }
}

/// Per-term loss and accuracy sums since the last report.
#[derive(Debug, Default, Clone)]
pub struct TermStats {
    pub loss_sum: f64,
    pub correct: i64,
    pub seen: i64,
    pub batches: u64,
}

/// Which gradients the module's graph must give, from the plan.
#[derive(Debug, Clone, Copy)]
struct GraphRules {
    /// Gradients go back to the module's input (module i−1 expects them).
    input_grad: bool,
    /// Every gradient on the output also goes to the input: parameter and input gradients
    /// come from one backward pass.
    all_continue: bool,
    /// Forward without the graph, rebuild it for the backward passes.
    recompute: bool,
}

/// Batch-norm running statistics, which a training forward moves: kept before each forward
/// when batches may be dropped, so that a dropped batch leaves them as they were.
struct RunningStats {
    buffers: Vec<Tensor>,
}

impl RunningStats {
    fn of(nets: &LocalNets) -> Self {
        let is_stat = |n: &str| n.contains("running_") || n.ends_with("num_batches_tracked");
        RunningStats {
            buffers: nets.state().into_iter().filter(|(n, _)| is_stat(n)).map(|(_, t)| t).collect(),
        }
    }

    fn copy(&self) -> Vec<Tensor> {
        self.buffers.iter().map(Tensor::copy).collect()
    }

    fn restore(&self, saved: &[Tensor]) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        for (b, s) in self.buffers.iter().zip(saved) {
            b.shallow_clone().f_copy_(s)?;
        }
        Ok(())
    }
}

/// Micro-batches per optimizer step, and how many of the current group are done.
#[derive(Debug, Clone, Copy)]
struct Accumulation {
    size: usize,
    done: usize,
}

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
    rules: GraphRules,
    group: Accumulation,
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
    pub stats: Vec<TermStats>,
}

/// Static settings of a module's runner.
pub struct ModuleSettings {
    pub lr: LrSchedule,
    pub optim: mlaan_core::config::OptimConfig,
    /// Whether gradients must be propagated to this module's input.
    pub input_grad: bool,
    /// Every gradient on the output also goes to the input (`NetworkPlan::all_gradients_continue`):
    /// parameter and input gradients then come from one backward pass.
    pub all_continue: bool,
    /// Micro-batches per optimizer step.
    pub accumulate: usize,
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
    /// Settings of module `m` of `plan`: its gradient routes come from the plan; one
    /// micro-batch per step, graphs kept, and EMA twins equal to their source (momentum 0).
    /// Callers override the rest with struct-update syntax.
    pub fn for_module(
        plan: &mlaan_core::plan::NetworkPlan,
        m: usize,
        lr: LrSchedule,
        optim: mlaan_core::config::OptimConfig,
    ) -> Self {
        ModuleSettings {
            lr,
            optim,
            input_grad: m > 0 && plan.incoming_reach_left(m - 1, m).is_some(),
            all_continue: plan.all_gradients_continue(m),
            accumulate: 1,
            recompute_graph: false,
            ema_momentum: 0.0,
            may_drop: false,
            loss_scale: false,
        }
    }
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
            rules: GraphRules {
                input_grad: s.input_grad,
                all_continue: s.all_continue,
                recompute: s.recompute_graph,
            },
            group: Accumulation { size: s.accumulate.max(1), done: 0 },
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
        let (h, graph_bytes) = if self.rules.recompute {
            // Keep only the input: the graph is rebuilt when the gradients are known, so the
            // module's graph and its terms' graphs are never alive together.
            (tch::no_grad(|| self.nets.forward(&x, Mode::Train)), 0)
        } else {
            count_saved(|| self.nets.forward(&x, Mode::Train))
        };
        let out = h.detach();
        let mut p = Pending::new(x, h, targets, graph_bytes, !self.rules.recompute);
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
        let has_input_grad = self.index > 0;
        match self.entry_mut(id, "gradient for")? {
            Entry::Live(p) => p.add(parts, has_input_grad),
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
        if self.rules.input_grad {
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
        let combined = self.rules.all_continue && !self.grads.backbone.is_empty();
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

    /// The parameter pass of batch `id`; steps when the accumulation group is complete.
    /// With `keep_input`, the input is kept for late gradients (async).
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
        self.group.done += 1;
        if self.group.done == self.group.size {
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

    /// Optimizer step with the accumulated gradients (a group of dropped batches has none
    /// and moves nothing), then EMA: publish real blocks, fold snapshots into twins.
    fn step_now(&mut self) -> Result<(), TrainError> {
        if let Some(sync) = &mut self.replicas {
            sync.average(self.grads.accumulated_mut(), &self.opt.params)?;
        }
        let lr = self.lr.at(self.step);
        let finite = match &mut self.scaler {
            Some(scaler) => scaler.check_step(self.grads.accumulated())?,
            None => true,
        };
        if finite {
            self.timed(Phase::Optimizer, |m| m.opt.step(m.grads.accumulated(), lr))?;
        }
        self.grads.clear();
        self.group.done = 0;
        let step = self.step;
        self.step += 1;
        self.timed(Phase::Ema, |m| m.ema.after_step(step))
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

    /// Bytes this module holds now: parameters, buffers, EMA twins, optimizer state,
    /// accumulated gradients, batches in progress (inputs, outputs and graphs) and kept
    /// inputs.
    pub fn live_bytes(&self) -> u64 {
        self.meter.fixed + self.opt.state_bytes() + self.grads.bytes() + self.batches.bytes()
    }

    /// Bytes the last calls held at their peak beyond what `live_bytes` shows after them;
    /// reset.
    pub fn take_call_transient(&mut self) -> u64 {
        self.meter.take_transient()
    }

    /// Whether the module has a term of this kind.
    pub fn has_term(&self, kind: TermKind) -> bool {
        self.nets.terms.iter().any(|t| t.spec.kind == kind)
    }

    /// Take rank 0's values of every state tensor the optimizer does not train (BatchNorm
    /// running statistics and EMA twins, which differ between replicas); nothing without
    /// replicas. Trained parameters are equal on every rank already.
    pub fn take_rank0_buffers(&mut self) -> Result<(), TrainError> {
        let Some(sync) = &mut self.replicas else { return Ok(()) };
        let trained: std::collections::HashSet<String> =
            self.opt.params.iter().map(|(n, _)| n.clone()).collect();
        let buffers: Vec<Tensor> = self
            .nets
            .state()
            .into_iter()
            .filter(|(n, _)| !trained.contains(n))
            .map(|(_, t)| t)
            .collect();
        sync.broadcast_from_rank0(&buffers)
    }

    /// The fp16 loss scale's state, for a checkpoint (`None` in fp32 and bf16).
    pub fn loss_scale_saved(&self) -> Option<[f64; 3]> {
        self.scaler.as_ref().map(LossScale::saved)
    }

    /// Continue with a checkpoint's loss scale (fp16; without one, or in fp32 and bf16,
    /// nothing changes).
    pub fn restore_loss_scale(&mut self, saved: Option<[f64; 3]>) -> Result<(), TrainError> {
        if let (Some(scaler), Some(v)) = (&mut self.scaler, saved) {
            *scaler = LossScale::from_saved(v).ok_or_else(|| TrainError::State {
                module: self.index,
                message: format!("loss scale {v:?} is not a scale, clean-step and skip count"),
            })?;
        }
        Ok(())
    }

    /// Steps skipped for a loss-scale overflow so far (fp16).
    pub fn overflow_skips(&self) -> u64 {
        self.scaler.as_ref().map_or(0, |s| s.skipped)
    }

    /// What averaging this module's gradients across replicas has cost so far.
    pub fn replica_traffic(&self) -> Traffic {
        self.replicas.as_ref().map(ReplicaSync::traffic).unwrap_or_default()
    }

    /// Join this module's group across the data-parallel replicas and take rank 0's state
    /// (after any checkpoint is loaded); from then on every step averages gradients first.
    pub fn join_replicas(&mut self, r: &Replicas) -> Result<(), TrainError> {
        let mut sync = ReplicaSync::join(r, self.index)?;
        sync.take_rank0_state(&self.nets.state(), &self.opt.momentum_buffers)?;
        self.replicas = Some(sync);
        Ok(())
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

    /// Accumulate gradients without stepping (tests).
    pub fn set_accumulate(&mut self, n: usize) {
        self.group.size = n.max(1);
    }

    /// Restore the optimizer from a checkpoint: momentum buffers by parameter name and the
    /// number of steps taken (which positions the learning-rate schedule).
    pub fn restore_optimizer(
        &mut self,
        momentum: &[(String, Tensor)],
        step: u64,
    ) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let device = self.nets.vs.device();
        for (name, buf) in momentum {
            let slot = self.grads.slot_of(name).ok_or_else(|| TrainError::State {
                module: self.index,
                message: format!("momentum for unknown parameter `{name}`"),
            })?;
            let shape = self.opt.params[slot].1.size();
            if buf.size() != shape {
                return Err(TrainError::State {
                    module: self.index,
                    message: format!(
                        "momentum of `{name}` has shape {:?}, the parameter {:?}",
                        buf.size(),
                        shape
                    ),
                });
            }
            self.opt.momentum_buffers[slot] = Some(buf.f_to_device(device)?.f_detach_copy()?);
        }
        self.step = step;
        Ok(())
    }
}

/// `g` times the loss scale, before a backward pass (as it is without one).
fn scaled(scaler: &Option<LossScale>, g: &Tensor) -> Tensor {
    match scaler {
        Some(s) => g * s.value(),
        None => g.shallow_clone(),
    }
}

/// A gradient of scaled losses in true units (as it is without a loss scale; undefined stays
/// undefined).
fn unscaled(scaler: &Option<LossScale>, g: &Tensor) -> Tensor {
    match scaler {
        Some(s) if g.defined() => s.unscale(g),
        _ => g.shallow_clone(),
    }
}

fn unknown(module: usize, what: &str, id: u64) -> TrainError {
    TrainError::Protocol(format!("module {module}: {what} unknown batch {id}"))
}

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

use crate::optim::{LrSchedule, Sgd};
use crate::{bytes_of, TrainError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mlaan_core::plan::TermKind;
use mlaan_models::layers::{count_saved, Mode};
use mlaan_models::losses;
use mlaan_models::module::{LocalNets, Targets};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
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
}

/// A weight snapshot of a real block, published after optimizer step `step`.
#[derive(Debug)]
pub struct EmaSnapshot {
    pub step: u64,
    pub params: Vec<Tensor>,
}

/// How a twin picks the snapshot it folds in after step `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmaLag {
    /// Exactly the real block after step `b − lag` (skip while `b < lag`).
    Steps(u64),
    /// Whatever was published most recently (async).
    Latest,
}

/// The receiving end of a twin: its parameters and the channel its real block publishes on.
pub struct TwinLink {
    pub block: String,
    pub params: Vec<Tensor>,
    pub rx: Receiver<EmaSnapshot>,
    pub lag: EmaLag,
    /// Snapshots received but not yet folded in, oldest first. They are part of the twin's
    /// state: a checkpoint saves them, so that a lagged twin resumes exactly.
    pub backlog: std::collections::VecDeque<EmaSnapshot>,
}

impl TwinLink {
    /// Move every snapshot that has arrived into the backlog.
    pub fn absorb(&mut self) {
        self.backlog.extend(self.rx.try_iter());
    }
}

/// The publishing end: the real block's parameters and a subscriber.
pub struct SourceLink {
    pub block: String,
    pub params: Vec<Tensor>,
    pub tx: Sender<EmaSnapshot>,
    pub device: Device,
}

/// State of a batch between its forward and its `finish`.
struct Pending {
    x: Tensor,
    h: Tensor,
    targets: BatchTargets,
    /// Σ of every gradient part on h (for the parameter pass).
    g_params: Option<Tensor>,
    /// Parts with reach left ≥ 1 not yet propagated to the input, by reach.
    g_unsent: BTreeMap<usize, Tensor>,
    graph_bytes: u64,
    /// Whether `h` carries its autograd graph (not yet, in recompute mode).
    has_graph: bool,
}

impl Pending {
    /// Input, output, graph and gradients of the batch.
    fn bytes(&self) -> u64 {
        bytes_of(&self.x)
            + bytes_of(&self.h)
            + self.graph_bytes
            + self.g_params.as_ref().map_or(0, bytes_of)
            + self.g_unsent.values().map(bytes_of).sum::<u64>()
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

/// One module and everything it owns.
pub struct LocalModule {
    pub nets: LocalNets,
    pub index: usize,
    opt: Sgd,
    lr: LrSchedule,
    grads: Vec<Option<Tensor>>,
    slot: HashMap<String, usize>,
    backbone: Vec<(usize, Tensor)>,
    term_params: Vec<Vec<(usize, Tensor)>>,
    pending: BTreeMap<u64, Pending>,
    /// Inputs kept for recomputation when a late gradient arrives (async).
    stored: BTreeMap<u64, (Tensor, BatchTargets)>,
    input_grad: bool,
    all_continue: bool,
    recompute_graph: bool,
    accumulate: usize,
    micro: usize,
    pub step: u64,
    pub twins: Vec<TwinLink>,
    pub sources: Vec<SourceLink>,
    ema_momentum: f64,
    stop: Arc<AtomicBool>,
    pub stats: Vec<TermStats>,
    /// Bytes the last call allocated and freed again before returning (term-network graphs,
    /// a rebuilt graph, a finished batch), which `live_bytes` after the call cannot see.
    call_transient: u64,
    /// Bytes of the networks' parameters, buffers and EMA twins: fixed shapes, counted once
    /// (`live_bytes` runs after every call).
    store_bytes: u64,
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
    pub stop: Arc<AtomicBool>,
}

impl ModuleSettings {
    /// Settings of module `m` of `plan`: its gradient routes come from the plan; one
    /// micro-batch per step, graphs kept, EMA twins equal to their source (momentum 0), and a
    /// stop flag of its own. Callers override the rest with struct-update syntax.
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
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

fn vjp(
    out: &Tensor,
    grad: &Tensor,
    inputs: &[&Tensor],
    keep_graph: bool,
) -> Result<Vec<Tensor>, TrainError> {
    let s = (out * grad).sum(Kind::Float);
    Ok(Tensor::f_run_backward(&[s], inputs, keep_graph, false)?)
}

fn add_into(acc: &mut Option<Tensor>, g: Tensor) -> Result<(), TrainError> {
    match acc {
        Some(a) => {
            let _ = a.f_add_(&g)?;
        }
        None => *acc = Some(g),
    }
    Ok(())
}

impl LocalModule {
    pub fn new(nets: LocalNets, s: ModuleSettings) -> Self {
        let params = nets.named_trainable(|_| true);
        let slot: HashMap<String, usize> =
            params.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        let with_slots = |v: Vec<(String, Tensor)>| -> Vec<(usize, Tensor)> {
            v.into_iter().map(|(n, t)| (slot[&n], t)).collect()
        };
        let backbone = with_slots(nets.backbone_params());
        let term_params = (0..nets.terms.len()).map(|t| with_slots(nets.term_params(t))).collect();
        let n = params.len();
        let stats = vec![TermStats::default(); nets.terms.len()];
        let store_bytes = nets.state().iter().map(|(_, t)| bytes_of(t)).sum();
        LocalModule {
            store_bytes,
            index: nets.index,
            opt: Sgd::new(params, &s.optim),
            lr: s.lr,
            grads: (0..n).map(|_| None).collect(),
            slot,
            backbone,
            term_params,
            pending: BTreeMap::new(),
            stored: BTreeMap::new(),
            input_grad: s.input_grad,
            all_continue: s.all_continue,
            recompute_graph: s.recompute_graph,
            accumulate: s.accumulate.max(1),
            micro: 0,
            step: 0,
            twins: Vec::new(),
            sources: Vec::new(),
            ema_momentum: s.ema_momentum,
            stop: s.stop,
            stats,
            call_transient: 0,
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
        let x = self.graph_input(x);
        let (h, graph_bytes) = if self.recompute_graph {
            // Keep only the input: the graph is rebuilt when the gradients are known, so the
            // module's graph and its terms' graphs are never alive together.
            (tch::no_grad(|| self.nets.forward(&x, Mode::Train)), 0)
        } else {
            count_saved(|| self.nets.forward(&x, Mode::Train))
        };
        let out = h.detach();
        let has_graph = !self.recompute_graph;
        self.pending.insert(
            id,
            Pending {
                x,
                h,
                targets,
                g_params: None,
                g_unsent: BTreeMap::new(),
                graph_bytes,
                has_graph,
            },
        );
        Ok(out)
    }

    /// Every term's loss on h: term networks get their gradients, ∂loss/∂h is kept by reach.
    /// Returns the unweighted losses.
    pub fn local_losses(&mut self, id: u64) -> Result<Vec<f64>, TrainError> {
        let mut losses = Vec::with_capacity(self.nets.terms.len());
        let p = self
            .pending
            .get(&id)
            .ok_or(TrainError::Protocol(format!("module {}: no batch {id}", self.index)))?;
        let hd = p.h.detach().set_requires_grad(true);
        let image = p.targets.image_u8.as_ref().map(|t| t.to_kind(Kind::Float) / 255.0);
        let labels = p.targets.labels.shallow_clone();
        let mut parts = Vec::new();
        self.call_transient = 0;
        for t in 0..self.nets.terms.len() {
            let spec = &self.nets.terms[t].spec;
            let (weight, reach) = (spec.weight, spec.reach);
            let targets = Targets { labels: &labels, image: image.as_ref() };
            let (out, bytes) = count_saved(|| self.nets.term_loss(t, &hd, &targets, Mode::Train));
            self.call_transient = self.call_transient.max(bytes);
            let loss = out.loss.f_double_value(&[])?;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite {
                    module: self.index,
                    batch: id,
                    what: format!("{:?} loss = {loss}", self.nets.terms[t].spec.kind),
                });
            }
            let st = &mut self.stats[t];
            st.loss_sum += loss;
            st.batches += 1;
            if let Some(l) = &out.logits {
                st.correct += losses::correct(l, &labels);
                st.seen += labels.size()[0];
            }
            losses.push(loss);
            let mut inputs: Vec<&Tensor> = vec![&hd];
            inputs.extend(self.term_params[t].iter().map(|(_, p)| p));
            let grads = Tensor::f_run_backward(&[out.loss * weight], &inputs, false, false)?;
            for ((slot, _), g) in self.term_params[t].iter().zip(&grads[1..]) {
                if g.defined() {
                    add_into(&mut self.grads[*slot], g.shallow_clone())?;
                }
            }
            if grads[0].defined() {
                parts.push(GradPart { reach_left: reach, grad: grads[0].shallow_clone() });
            }
        }
        self.add_grads(id, parts)?;
        Ok(losses)
    }

    /// Gradient parts on h of batch `id` from later modules (or from this module's terms).
    pub fn add_grads(&mut self, id: u64, parts: Vec<GradPart>) -> Result<(), TrainError> {
        let index = self.index;
        let p = self.pending.get_mut(&id).ok_or(TrainError::Protocol(format!(
            "module {index}: gradient for unknown batch {id}"
        )))?;
        for part in parts {
            if part.reach_left >= 1 && index > 0 {
                let e = p.g_unsent.remove(&part.reach_left);
                let mut acc = e;
                add_into(&mut acc, part.grad.shallow_clone())?;
                p.g_unsent.insert(part.reach_left, acc.expect("just set"));
            }
            add_into(&mut p.g_params, part.grad)?;
        }
        Ok(())
    }

    /// Rebuild the graph of a batch forwarded without one (recompute mode): the same values,
    /// batch statistics untouched.
    fn ensure_graph(&mut self, id: u64) -> Result<(), TrainError> {
        let p = self.pending.get_mut(&id).ok_or(TrainError::Protocol(format!("no batch {id}")))?;
        if !p.has_graph {
            let nets = &self.nets;
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
        if self.input_grad {
            x.detach().set_requires_grad(true)
        } else {
            x.detach()
        }
    }

    /// ∂L/∂x for every part that reaches further back, as parts for module i−1.
    pub fn propagate(&mut self, id: u64) -> Result<Vec<GradPart>, TrainError> {
        let index = self.index;
        let unsent_any = self.pending.get(&id).is_some_and(|p| !p.g_unsent.is_empty());
        if unsent_any {
            self.ensure_graph(id)?;
        }
        let p = self
            .pending
            .get_mut(&id)
            .ok_or(TrainError::Protocol(format!("module {index}: propagate unknown batch {id}")))?;
        let unsent = std::mem::take(&mut p.g_unsent);
        let mut out = Vec::with_capacity(unsent.len());
        let combined = self.all_continue && !self.backbone.is_empty();
        for (reach, g) in unsent {
            let mut inputs: Vec<&Tensor> = vec![&p.x];
            if combined {
                inputs.extend(self.backbone.iter().map(|(_, t)| t));
            }
            let grads = vjp(&p.h, &g, &inputs, true)?;
            out.push(GradPart { reach_left: reach - 1, grad: grads[0].shallow_clone() });
            for ((slot, _), pg) in self.backbone.iter().zip(grads.into_iter().skip(1)) {
                if pg.defined() {
                    add_into(&mut self.grads[*slot], pg)?;
                }
            }
        }
        if combined {
            // Every part went back with its parameter gradient: nothing left for `finish`.
            p.g_params = None;
        }
        Ok(out)
    }

    /// The parameter pass of batch `id`; steps when the accumulation group is complete.
    /// With `keep_input`, the input is stored for late gradients (async).
    pub fn finish(&mut self, id: u64, keep_input: bool) -> Result<(), TrainError> {
        let index = self.index;
        if self.pending.get(&id).is_some_and(|p| p.g_params.is_some()) {
            self.ensure_graph(id)?;
        }
        let p = self
            .pending
            .remove(&id)
            .ok_or(TrainError::Protocol(format!("module {index}: finish unknown batch {id}")))?;
        if let Some(g) = &p.g_params {
            self.param_pass(&p.h, g)?;
        }
        self.call_transient = p.bytes();
        if keep_input {
            self.stored.insert(id, (p.x.detach(), p.targets));
        }
        self.micro += 1;
        if self.micro == self.accumulate {
            self.step_now()?;
        }
        Ok(())
    }

    fn param_pass(&mut self, h: &Tensor, g: &Tensor) -> Result<(), TrainError> {
        if self.backbone.is_empty() || !h.requires_grad() {
            return Ok(());
        }
        let inputs: Vec<&Tensor> = self.backbone.iter().map(|(_, t)| t).collect();
        let grads = vjp(h, g, &inputs, false)?;
        for ((slot, _), g) in self.backbone.iter().zip(grads) {
            if g.defined() {
                add_into(&mut self.grads[*slot], g)?;
            }
        }
        Ok(())
    }

    /// A late gradient for a finished batch (async): recompute the module on the stored input
    /// under the current weights (batch-norm statistics untouched), add its parameter
    /// gradient to the next step, and return the parts that reach further back. `last` drops
    /// the stored input.
    pub fn apply_late(
        &mut self,
        id: u64,
        parts: Vec<GradPart>,
        last: bool,
    ) -> Result<Vec<GradPart>, TrainError> {
        let index = self.index;
        let (x0, targets) = self.stored.remove(&id).ok_or(TrainError::Protocol(format!(
            "module {index}: late gradient for unknown batch {id}"
        )))?;
        let x = self.graph_input(&x0);
        let (h, graph_bytes) = count_saved(|| self.nets.forward(&x, Mode::Recompute));
        let keep = if last { None } else { Some((x0, targets)) };
        self.pending.insert(
            id,
            Pending {
                x,
                h,
                targets: BatchTargets { labels: Tensor::new(), image_u8: None },
                g_params: None,
                g_unsent: BTreeMap::new(),
                graph_bytes,
                has_graph: true,
            },
        );
        self.add_grads(id, parts)?;
        let back = self.propagate(id)?;
        let p = self.pending.remove(&id).expect("inserted above");
        if let Some(g) = &p.g_params {
            self.param_pass(&p.h, g)?;
        }
        self.call_transient = p.bytes();
        if let Some(k) = keep {
            self.stored.insert(id, k);
        }
        Ok(back)
    }

    /// Drop a stored input whose last gradient part has arrived (or that will get none).
    pub fn release(&mut self, id: u64) {
        self.stored.remove(&id);
    }

    pub fn stored_count(&self) -> usize {
        self.stored.len()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Optimizer step with the accumulated gradients, then EMA: publish real blocks, fold
    /// snapshots into twins.
    fn step_now(&mut self) -> Result<(), TrainError> {
        let lr = self.lr.at(self.step);
        self.opt.step(&self.grads, lr)?;
        self.grads.iter_mut().for_each(|g| *g = None);
        self.micro = 0;
        let step = self.step;
        self.step += 1;
        for s in &self.sources {
            let params = s
                .params
                .iter()
                .map(|p| p.f_to_device_(s.device, p.kind(), false, true))
                .collect::<Result<Vec<_>, _>>()?;
            // A closed subscriber means its stage is gone; the pipeline is stopping.
            let _ = s.tx.send(EmaSnapshot { step, params });
        }
        for t in 0..self.twins.len() {
            if let Some(snap) = self.next_snapshot(t, step)? {
                let pairs: Vec<(Tensor, Tensor)> = self.twins[t]
                    .params
                    .iter()
                    .zip(snap.params)
                    .map(|(e, r)| (e.shallow_clone(), r))
                    .collect();
                mlaan_models::lam::ema_update(&pairs, self.ema_momentum)?;
            }
        }
        Ok(())
    }

    /// The snapshot twin `t` folds in after step `step`, waiting for it when exactness asks.
    fn next_snapshot(&mut self, t: usize, step: u64) -> Result<Option<EmaSnapshot>, TrainError> {
        let index = self.index;
        let link = &mut self.twins[t];
        match link.lag {
            EmaLag::Latest => {
                link.absorb();
                let last = link.backlog.pop_back();
                link.backlog.clear();
                Ok(last)
            }
            EmaLag::Steps(lag) => {
                if step < lag {
                    return Ok(None);
                }
                let want = step - lag;
                loop {
                    let next = match link.backlog.pop_front() {
                        Some(s) => s,
                        None => match link.rx.recv_timeout(Duration::from_millis(50)) {
                            Ok(s) => s,
                            Err(RecvTimeoutError::Timeout) => {
                                if self.stop.load(Ordering::Relaxed) {
                                    return Err(TrainError::Stopped);
                                }
                                continue;
                            }
                            Err(RecvTimeoutError::Disconnected) => return Err(TrainError::Stopped),
                        },
                    };
                    match next.step.cmp(&want) {
                        std::cmp::Ordering::Equal => return Ok(Some(next)),
                        std::cmp::Ordering::Less => continue,
                        std::cmp::Ordering::Greater => {
                            return Err(TrainError::Protocol(format!(
                                "module {index}: EMA twin of {} wanted step {want}, got {}",
                                link.block, next.step
                            )))
                        }
                    }
                }
            }
        }
    }

    /// Bytes this module holds now: parameters, buffers, EMA twins, optimizer state,
    /// accumulated gradients, batches in progress (inputs, outputs and graphs) and stored
    /// inputs.
    pub fn live_bytes(&self) -> u64 {
        let stores = self.store_bytes;
        let grads: u64 = self.grads.iter().flatten().map(bytes_of).sum();
        let pending: u64 = self.pending.values().map(Pending::bytes).sum();
        let stored: u64 =
            self.stored.values().map(|(x, t)| bytes_of(x) + bytes_of(&t.labels)).sum();
        stores + self.opt.state_bytes() + grads + pending + stored
    }

    /// Bytes the last call held at its peak beyond what `live_bytes` shows after it; reset.
    pub fn take_call_transient(&mut self) -> u64 {
        std::mem::take(&mut self.call_transient)
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
        self.slot.get(name).copied()
    }

    /// Accumulated gradient of every trainable parameter (tests compare them).
    pub fn accumulated_grads(&self) -> Vec<(String, Option<Tensor>)> {
        self.opt
            .params
            .iter()
            .zip(&self.grads)
            .map(|((n, _), g)| (n.clone(), g.as_ref().map(|t| t.shallow_clone())))
            .collect()
    }

    /// Accumulate gradients without stepping (tests).
    pub fn set_accumulate(&mut self, n: usize) {
        self.accumulate = n.max(1);
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
            let slot = self.slot.get(name).copied().ok_or_else(|| TrainError::State {
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

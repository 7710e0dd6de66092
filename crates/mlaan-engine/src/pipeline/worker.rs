//! A stage worker: the thread that owns one stage. Its loop waits for what the schedule waits
//! for (through the [`Port`]), hands the event to the schedule, and executes the actions the
//! schedule returns on the message the event carried. It decides nothing about order itself.

use super::messages::{Event, Failure, FaultKind, Forward, ModuleEval, PipelineSettings};
use super::port::{Port, Received};
use super::window::{StageView, Window};
use super::wiring::snapshot;
use crate::module::BatchTargets;
use crate::stage::{BackMsg, Stage};
use crate::{bytes_of, TrainError};
use crossbeam_channel::Sender;
use mlaan_core::config::MemoryFormat;
use mlaan_core::schedule::{
    Action, AsyncSchedule, Input, StageEvent, StageSchedule, SyncSchedule, Wait,
};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A stage worker's fixed surroundings, built by `Pipeline::start`.
pub struct WorkerParts {
    pub index: usize,
    pub stage: Stage,
    pub next_device: Option<Device>,
    pub settings: PipelineSettings,
    pub port: Port,
    pub events: Sender<Event>,
    /// Bytes queued towards this stage, counted in its memory probe.
    pub queued_bytes: Arc<AtomicU64>,
}

/// Run one stage to its end on this thread; a failure or panic becomes `Event::Failed`.
pub fn run_stage(
    build: impl FnOnce() -> Result<WorkerParts, TrainError>,
    index: usize,
    modules: Vec<usize>,
    events: Sender<Event>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let current = Arc::new(AtomicU64::new(u64::MAX));
    let cur = current.clone();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut w = StageWorker::new(build()?, cur);
        let r = w.run();
        let _ = w.events.send(Event::Exited {
            stage: w.index,
            live_bytes: w.stage.live_bytes(),
            peak_live_bytes: w.peak_live,
        });
        r
    }));
    let batch = match current.load(Ordering::Relaxed) {
        u64::MAX => None,
        b => Some(b),
    };
    let mut secondary = false;
    let cause = match result {
        Ok(Ok(())) | Ok(Err(TrainError::Stopped)) => return,
        Ok(Err(e)) => {
            secondary = matches!(e, TrainError::Peer(_));
            e
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            TrainError::Panicked(msg)
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = events.send(Event::Failed(Failure { stage: index, modules, batch, cause, secondary }));
}

/// A training batch as it arrived: its data, or word that an earlier stage dropped it.
enum Batch {
    Data(Tensor, BatchTargets),
    Dropped,
}

/// The message the last event carried, kept for the actions that work on it.
#[derive(Default)]
struct Inbox {
    train: Option<Batch>,
    grad: Option<BackMsg>,
    control: Option<Forward>,
}

impl Inbox {
    /// An input message (`None`: the input closed) as the event the schedule sees.
    fn input(&mut self, msg: Option<Forward>) -> StageEvent {
        StageEvent::Input(match msg {
            None => Input::Closed,
            Some(Forward::Train { id, x, targets }) => {
                self.train = Some(Batch::Data(x, targets));
                Input::Train(id)
            }
            Some(Forward::Skip { id }) => {
                self.train = Some(Batch::Dropped);
                Input::Train(id)
            }
            Some(other) => {
                self.control = Some(other);
                Input::Control
            }
        })
    }

    fn grad(&mut self, msg: BackMsg) -> StageEvent {
        let event = StageEvent::Grad { id: msg.id, last: msg.last };
        self.grad = Some(msg);
        event
    }
}

/// Mean and standard deviation that stage 0 normalises raw images with.
struct Normalize {
    mean: Tensor,
    std: Tensor,
}

struct StageWorker {
    index: usize,
    stage: Stage,
    next_device: Option<Device>,
    settings: PipelineSettings,
    port: Port,
    events: Sender<Event>,
    /// The batch being worked on, for the failure report.
    current: Arc<AtomicU64>,
    window: Window,
    peak_live: u64,
    normalize: Normalize,
    eval: Vec<ModuleEval>,
    queued_bytes: Arc<AtomicU64>,
    last_forward: u64,
}

impl StageWorker {
    fn new(p: WorkerParts, current: Arc<AtomicU64>) -> Self {
        let device = p.stage.device;
        let c = p.settings.image.channels as i64;
        let per_channel = |v: &[f32]| Tensor::from_slice(v).view([1, c, 1, 1]).to_device(device);
        let normalize =
            Normalize { mean: per_channel(&p.settings.mean), std: per_channel(&p.settings.std) };
        StageWorker {
            index: p.index,
            stage: p.stage,
            next_device: p.next_device,
            settings: p.settings,
            port: p.port,
            events: p.events,
            current,
            window: Window::default(),
            peak_live: 0,
            normalize,
            eval: Vec::new(),
            queued_bytes: p.queued_bytes,
            last_forward: 0,
        }
    }

    /// The worker loop: wait for what the schedule waits for, hand the event to the
    /// schedule, execute its actions on the message the event carried.
    fn run(&mut self) -> Result<(), TrainError> {
        self.window = Window::default();
        let mut schedule = self.schedule();
        let mut inbox = Inbox::default();
        loop {
            let event = match schedule.wait() {
                Wait::Input => inbox.input(self.port.recv_input()?),
                Wait::Grad => inbox.grad(self.port.recv_grad()?),
                Wait::GradOrInput => match self.port.recv_grad_or_input()? {
                    Received::Grad(msg) => inbox.grad(msg),
                    Received::Input(msg) => inbox.input(msg),
                },
            };
            let actions = schedule
                .on(event)
                .map_err(|e| TrainError::Protocol(format!("stage {}: {e}", self.index)))?;
            for action in actions {
                if self.execute(action, &mut inbox)? {
                    return Ok(());
                }
            }
            self.check_stored(&schedule)?;
        }
    }

    /// This stage's schedule (`sequential` is `sync` on one stage).
    fn schedule(&self) -> StageSchedule {
        use mlaan_core::config::Schedule;
        match self.settings.schedule {
            Schedule::Async => StageSchedule::Async(AsyncSchedule::new(
                self.settings.in_flight,
                self.port.grads_in.is_some(),
                self.stage.stores_inputs(),
            )),
            Schedule::Sync | Schedule::Sequential => StageSchedule::Sync(SyncSchedule::new(
                self.settings.accumulate,
                self.stage.routes.expects_next,
            )),
        }
    }

    /// Async: the schedule's count of stored inputs must be the modules' own.
    fn check_stored(&self, schedule: &StageSchedule) -> Result<(), TrainError> {
        match schedule {
            StageSchedule::Async(a) if a.stored() != self.stage.outstanding() => {
                Err(TrainError::Protocol(format!(
                    "stage {}: the schedule counts {} stored inputs, the modules {}",
                    self.index,
                    a.stored(),
                    self.stage.outstanding()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Do `action` on what `inbox` holds; `true` when the loop is to end.
    fn execute(&mut self, action: Action, inbox: &mut Inbox) -> Result<bool, TrainError> {
        let missing = |what: &str| TrainError::Protocol(format!("{action:?} without {what}"));
        match action {
            Action::Forward(id) => match inbox.train.take().ok_or_else(|| missing("a batch"))? {
                Batch::Data(x, targets) => self.train_batch(id, x, targets)?,
                Batch::Dropped => self.pass_dropped(id)?,
            },
            Action::Sweep(_) => {
                let msg = inbox.grad.take().ok_or_else(|| missing("a gradient"))?;
                self.sweep(msg)?;
            }
            Action::Late(_) => {
                let msg = inbox.grad.take().ok_or_else(|| missing("a gradient"))?;
                self.receive_late(msg)?;
            }
            Action::Step { id, keep_inputs } => self.step(id, keep_inputs)?,
            Action::Control => {
                let msg = inbox.control.take().ok_or_else(|| missing("a control message"))?;
                self.control(msg)?;
            }
            Action::Exit => return Ok(true),
        }
        Ok(false)
    }

    /// Forward, local losses and early sweep of a training batch; the output goes on, what
    /// left the front goes back. A batch dropped here goes on as `Forward::Skip`.
    fn train_batch(&mut self, id: u64, x: Tensor, targets: BatchTargets) -> Result<(), TrainError> {
        self.current.store(id, Ordering::Relaxed);
        let in_bytes = bytes_of(&x);
        self.queued_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(in_bytes))
            })
            .ok();
        let t = Instant::now();
        let x = self.stage_input(x)?;
        let x = self.inject(id, x)?;
        let targets = targets.to_device(self.stage.device);
        let done = self.stage.process(id, &x, &targets, self.settings.on_nonfinite)?;
        self.note_live();
        self.window.busy += t.elapsed();
        match done.output {
            Ok(h) => {
                if let Some(next) = self.next_device {
                    let t = Instant::now();
                    let (x, targets) = (h.to_device(next), targets.to_device(next));
                    self.window.busy += t.elapsed();
                    self.port.send_forward(Forward::Train { id, x, targets })?;
                }
                self.window.batches += 1;
                self.window.images += targets.labels.size()[0] as u64;
            }
            Err(cause) => {
                let _ = self.events.send(Event::Skipped { stage: self.index, batch: id, cause });
                // Counted, not as images: a window of dropped batches still reports.
                self.window.batches += 1;
                self.port.send_forward(Forward::Skip { id })?;
            }
        }
        self.send_back(self.stage.routes.back_message(id, done.front, None))?;
        self.last_forward = id;
        Ok(())
    }

    /// A batch an earlier stage dropped: drop it here, pass the word on, answer as usual.
    fn pass_dropped(&mut self, id: u64) -> Result<(), TrainError> {
        self.stage.drop_batch(id)?;
        self.window.batches += 1;
        self.port.send_forward(Forward::Skip { id })?;
        self.send_back(self.stage.routes.back_message(id, Vec::new(), None))?;
        self.last_forward = id;
        Ok(())
    }

    /// Parameter passes and steps of batch `id`, then the EMA folds they made due: a twin
    /// whose exact snapshot comes from a later stage waits for it here.
    fn step(&mut self, id: u64, keep_inputs: bool) -> Result<(), TrainError> {
        let t = Instant::now();
        self.stage.finish(id, keep_inputs)?;
        self.note_live();
        self.window.busy += t.elapsed();
        for m in self.stage.modules.iter_mut() {
            while let Some((twin, rx)) = m.ema.awaited() {
                let rx = rx.clone();
                let snap = self.port.recv_ema(&rx)?;
                m.ema.deliver(twin, snap)?;
            }
        }
        self.maybe_report()
    }

    /// A gradient message for a batch still pending (sync).
    fn sweep(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let t = Instant::now();
        let out = self.stage.receive(msg.id, msg.parts)?;
        self.note_live();
        self.window.busy += t.elapsed();
        self.send_back(self.stage.routes.back_message(msg.id, out, Some(msg.last)))
    }

    /// A gradient message for a finished batch (async).
    fn receive_late(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let t = Instant::now();
        self.window.last_lag = self.last_forward.saturating_sub(msg.id);
        let out = self.stage.late(msg.id, msg.parts, msg.last)?;
        self.note_live();
        self.window.busy += t.elapsed();
        self.send_back(self.stage.routes.back_message(msg.id, out, Some(msg.last)))
    }

    fn send_back(&mut self, msg: Option<BackMsg>) -> Result<(), TrainError> {
        msg.map_or(Ok(()), |m| self.port.send_back(m))
    }

    /// Normalise raw images on stage 0.
    fn stage_input(&self, x: Tensor) -> Result<Tensor, TrainError> {
        let device = self.stage.device;
        if self.stage.first_module() == 0 {
            // Non-blocking: asynchronous from pinned memory, ordered before the ops that use
            // it on the device's stream (and a plain copy from pageable memory).
            let x = x.to_device_(device, x.kind(), true, false);
            let x = (x.to_kind(Kind::Float) / 255.0 - &self.normalize.mean) / &self.normalize.std;
            Ok(match self.settings.compute.memory_format {
                MemoryFormat::ChannelsLast => mlaan_accel::to_channels_last(&x)?,
                MemoryFormat::Contiguous => x,
            })
        } else {
            Ok(x.to_device(device))
        }
    }

    fn inject(&mut self, id: u64, x: Tensor) -> Result<Tensor, TrainError> {
        match self.settings.fault {
            Some(f) if f.stage == self.index && f.batch == id => match f.kind {
                FaultKind::Error => Err(TrainError::Injected(id)),
                FaultKind::Panic => panic!("injected panic at batch {id}"),
                FaultKind::NaN => Ok(x * f64::NAN),
                FaultKind::CloseChannel => {
                    self.port.close();
                    Err(TrainError::Stopped)
                }
            },
            _ => Ok(x),
        }
    }

    /// Evaluation, drain and collection messages (no training batch in flight here).
    fn control(&mut self, msg: Forward) -> Result<(), TrainError> {
        match msg {
            Forward::Train { .. } | Forward::Skip { .. } => {
                unreachable!("training batches are the schedule's")
            }
            Forward::Eval { x, labels } => {
                let t = Instant::now();
                let x = self.stage_input(x)?;
                let labels = labels.to_device(self.stage.device);
                let h = tch::no_grad(|| self.evaluate(&x, &labels));
                self.window.busy += t.elapsed();
                if let Some(next) = self.next_device {
                    let (x, labels) = (h.to_device(next), labels.to_device(next));
                    self.port.send_forward(Forward::Eval { x, labels })?;
                }
            }
            Forward::EvalEnd => {
                let modules = std::mem::take(&mut self.eval);
                let _ = self.events.send(Event::Eval { stage: self.index, modules });
                self.port.send_forward(Forward::EvalEnd)?;
            }
            Forward::TakeRank0Buffers => {
                for m in &mut self.stage.modules {
                    m.take_rank0_buffers()?;
                }
                self.port.send_forward(Forward::TakeRank0Buffers)?;
            }
            Forward::Collect => {
                let modules =
                    self.stage.modules.iter_mut().map(snapshot).collect::<Result<Vec<_>, _>>()?;
                let _ = self.events.send(Event::State { stage: self.index, modules });
                self.port.send_forward(Forward::Collect)?;
            }
            Forward::Drain { tag } => {
                self.report()?;
                if self.port.output.is_some() {
                    self.port.send_forward(Forward::Drain { tag })?;
                } else {
                    let _ = self.events.send(Event::Drained { tag });
                }
            }
        }
        Ok(())
    }

    /// Every module's probe accuracy (and the classifier's loss) on one evaluation batch.
    fn evaluate(&mut self, x: &Tensor, labels: &Tensor) -> Tensor {
        if self.eval.is_empty() {
            self.eval = self
                .stage
                .modules
                .iter()
                .map(|m| ModuleEval { module: m.index, ..Default::default() })
                .collect();
        }
        let n = labels.size()[0];
        let mut h = x.shallow_clone();
        for (m, e) in self.stage.modules.iter().zip(self.eval.iter_mut()) {
            h = m.nets.forward(&h, mlaan_models::Mode::Eval);
            if let Some(logits) = m.nets.probe_logits(&h) {
                e.has_head = true;
                e.correct += mlaan_models::losses::correct(&logits, labels);
                e.seen += n;
                if m.nets.classifier.is_some() {
                    e.loss_sum += mlaan_models::losses::cross_entropy(&logits, labels)
                        .double_value(&[])
                        * n as f64;
                }
            }
        }
        h
    }

    fn note_live(&mut self) {
        let peak = self.stage.take_peak() + self.queued_bytes.load(Ordering::Relaxed);
        self.window.peak_live = self.window.peak_live.max(peak);
        self.peak_live = self.peak_live.max(peak);
    }

    fn maybe_report(&mut self) -> Result<(), TrainError> {
        let step = self.stage.modules[0].step;
        if step > 0 && step.is_multiple_of(self.settings.log_every) {
            self.report()?;
        }
        Ok(())
    }

    /// Send the current window's metrics to the coordinator and start a new window (nothing
    /// when the window trained no batch).
    fn report(&mut self) -> Result<(), TrainError> {
        if self.window.batches == 0 {
            return Ok(());
        }
        let view = StageView {
            index: self.index,
            device: self.stage.device,
            stage: &self.stage,
            waits: self.port.take_waits(),
            queue_depth: self.port.input.len(),
            queued_bytes: self.queued_bytes.load(Ordering::Relaxed),
        };
        let window = self.window.close(view);
        let term_losses = self
            .stage
            .modules
            .iter_mut()
            .map(|m| {
                let mean = |s: &crate::module::TermStats| {
                    if s.batches > 0 {
                        s.loss_sum / s.batches as f64
                    } else {
                        f64::NAN
                    }
                };
                let l = m.stats.iter().map(mean).collect();
                m.stats.iter_mut().for_each(|s| *s = Default::default());
                (m.index, l)
            })
            .collect();
        let step = self.stage.modules[0].step;
        let lr = self.settings.lr.at(step.saturating_sub(1));
        self.events
            .send(Event::Window { stage: self.index, window, step, lr, term_losses })
            .map_err(|_| TrainError::Stopped)
    }
}

//! A stage worker: the thread that owns one stage. Its loop waits for what the schedule waits
//! for (through the [`Port`]), hands the event to the schedule, and executes the actions the
//! schedule returns on the message the event carried. It decides nothing about order itself,
//! and knows nothing of modules: everything it does to the batch is a call on its [`Stage`].

use super::faults::Fault;
use super::port::{Port, Received};
use super::settings::PipelineSettings;
use super::window::{StageView, Window};
use crate::error::TrainError;
use crate::stage::Stage;
use crate::wire::{BackMsg, BatchTargets, Event, Failure, Forward};
use crossbeam_channel::Sender;
use mlaan_core::schedule::{
    Action, AsyncSchedule, Input, StageEvent, StageSchedule, SyncSchedule, Wait,
};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

/// A stage worker's fixed surroundings, built by `Pipeline::start`.
pub struct WorkerParts {
    pub index: usize,
    pub stage: Stage,
    pub settings: PipelineSettings,
    pub port: Port,
    pub events: Sender<Event>,
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
        // An error met after a replica group failed underneath (an aborted communicator makes
        // the next device operation fail) is told as that failure, which names the peer.
        let r = w.run().map_err(|e| w.stage.replica_failure().unwrap_or(e));
        let _ = w.events.send(Event::Exited {
            stage: w.index,
            live_bytes: w.stage.live_bytes(),
            peak_live_bytes: w.stage.memory.run_peak(),
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

struct StageWorker {
    index: usize,
    stage: Stage,
    settings: PipelineSettings,
    port: Port,
    events: Sender<Event>,
    /// The batch being worked on, for the failure report.
    current: Arc<AtomicU64>,
    window: Window,
    last_forward: u64,
}

impl StageWorker {
    fn new(p: WorkerParts, current: Arc<AtomicU64>) -> Self {
        StageWorker {
            index: p.index,
            stage: p.stage,
            settings: p.settings,
            port: p.port,
            events: p.events,
            current,
            window: Window::default(),
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
                self.stage.routes.stores_inputs(),
            )),
            Schedule::Sync | Schedule::Sequential => StageSchedule::Sync(SyncSchedule::new(
                self.settings.micro,
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
        let t = Instant::now();
        let x = Fault::inject(self.settings.fault, self.index, id, x, &mut self.port)?;
        let done = self.stage.process(id, &x, &targets, self.settings.on_nonfinite)?;
        self.stage.note_peak();
        self.window.busy += t.elapsed();
        match done.output {
            Ok(h) => {
                self.window.batches += 1;
                self.window.images += targets.labels.size()[0] as u64;
                // The next stage's hand-off moves it to its device.
                self.port.send_forward(Forward::Train { id, x: h, targets })?;
            }
            Err(cause) => {
                let _ = self.events.send(Event::Skipped { stage: self.index, batch: id, cause });
                // Counted, not as images: a window of dropped batches still reports.
                self.window.batches += 1;
                self.port.send_forward(Forward::Skip { id })?;
            }
        }
        self.send_back(self.stage.back_message(id, done.front, None))?;
        self.last_forward = id;
        Ok(())
    }

    /// A batch an earlier stage dropped: drop it here, pass the word on, answer as usual.
    fn pass_dropped(&mut self, id: u64) -> Result<(), TrainError> {
        self.stage.drop_batch(id)?;
        self.window.batches += 1;
        self.port.send_forward(Forward::Skip { id })?;
        self.send_back(self.stage.back_message(id, Vec::new(), None))?;
        self.last_forward = id;
        Ok(())
    }

    /// Parameter passes and steps of batch `id`, then the EMA folds they made due: a twin
    /// whose exact snapshot comes from a later stage waits for it here.
    fn step(&mut self, id: u64, keep_inputs: bool) -> Result<(), TrainError> {
        let t = Instant::now();
        self.stage.finish(id, keep_inputs)?;
        self.stage.note_peak();
        self.window.busy += t.elapsed();
        while let Some((module, twin, rx)) = self.stage.awaited_ema() {
            let snap = self.port.recv_ema(&rx)?;
            self.stage.deliver_ema(module, twin, snap)?;
        }
        self.maybe_report()
    }

    /// A gradient message for a batch still pending (sync).
    fn sweep(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let t = Instant::now();
        let out = self.stage.receive(msg.id, msg.parts)?;
        self.stage.note_peak();
        self.window.busy += t.elapsed();
        self.send_back(self.stage.back_message(msg.id, out, Some(msg.last)))
    }

    /// A gradient message for a finished batch (async).
    fn receive_late(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let t = Instant::now();
        self.window.last_lag = self.last_forward.saturating_sub(msg.id);
        let out = self.stage.late(msg.id, msg.parts, msg.last)?;
        self.stage.note_peak();
        self.window.busy += t.elapsed();
        self.send_back(self.stage.back_message(msg.id, out, Some(msg.last)))
    }

    fn send_back(&mut self, msg: Option<BackMsg>) -> Result<(), TrainError> {
        msg.map_or(Ok(()), |m| self.port.send_back(m))
    }

    /// Evaluation, drain and collection messages (no training batch in flight here).
    fn control(&mut self, msg: Forward) -> Result<(), TrainError> {
        match msg {
            Forward::Train { .. } | Forward::Skip { .. } => {
                unreachable!("training batches are the schedule's")
            }
            Forward::Eval { x, labels } => {
                let t = Instant::now();
                let h = tch::no_grad(|| self.stage.eval_batch(&x, &labels))?;
                self.window.busy += t.elapsed();
                self.port.send_forward(Forward::Eval { x: h, labels })?;
            }
            Forward::EvalEnd => {
                let modules = self.stage.take_eval();
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
                let modules = self
                    .stage
                    .modules
                    .iter_mut()
                    .map(|m| m.save())
                    .collect::<Result<Vec<_>, _>>()?;
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
            stage: &mut self.stage,
            waits: self.port.take_waits(),
            queue_depth: self.port.input.len(),
        };
        let window = self.window.close(view);
        let term_losses = self.stage.take_term_losses();
        let step = self.stage.modules[0].step;
        let lr = self.settings.lr.at(step.saturating_sub(1));
        self.events
            .send(Event::Window { stage: self.index, window, step, lr, term_losses })
            .map_err(|_| TrainError::Stopped)
    }
}

//! The pipeline: one worker thread per stage, bounded channels between neighbours, and the
//! coordinator's handle on it.
//!
//! ```text
//!             Forward::Train{id, h, labels}      (bounded: in_flight)
//! coordinator ─────────▶ stage 0 ─────────▶ stage 1 ─────────▶ … ─────────▶ stage D-1
//!     ▲                    ▲  ◀── BackMsg{id, ∂h, last} ──┘ (cascade gradients, MLAAN only)
//!     │                    └── EmaSnapshot (real block weights → twins in earlier stages)
//!     └──────────── Event (metric windows, eval results, drained, failed) ◀── every stage
//! ```
//!
//! Schedules (decided by the state machines of `mlaan_core::schedule`, executed here):
//! - `sync`: a stage keeps the graph of batch b until the next stage's gradient for b arrives,
//!   then steps; with one stage holding every module this is the `sequential` reference.
//! - `async`: a stage steps at once on what it has; a cascade gradient arriving later for
//!   batch b is applied by recomputing the stage on b's stored input under current weights.
//!   At most `in_flight` inputs are stored, which bounds both memory and gradient lag.
//!
//! Failure: a stage that errors or panics reports `Event::Failed` and drops its channels; its
//! neighbours see the disconnection and stop; the coordinator joins every thread.

use crate::init::{build_nets, load_state, ImageSpec, ModuleState};
use crate::module::{
    BatchTargets, EmaLag, EmaSnapshot, LocalModule, ModuleSettings, SourceLink, TwinLink,
};
use crate::optim::LrSchedule;
use crate::stage::{BackMsg, Stage};
use crate::{bytes_of, TrainError};
use crossbeam_channel::{
    bounded, select, unbounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender,
};
use mlaan_core::config::{EmaLagRule, OnNonFinite, OptimConfig, Schedule};
use mlaan_core::metrics::StageWindow;
use mlaan_core::placement::Placement;
use mlaan_core::plan::NetworkPlan;
use mlaan_core::schedule::{
    Action, AsyncSchedule, Input, StageEvent, StageSchedule, SyncSchedule, Wait,
};
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// How often a blocked channel operation looks at the stop flag: a stopped pipeline is noticed
/// within this, and an idle worker wakes no more often.
const POLL: Duration = Duration::from_millis(50);

/// Messages flowing forward.
pub enum Forward {
    /// A training batch: stage input (raw `u8` images for stage 0) and targets.
    Train { id: u64, x: Tensor, targets: BatchTargets },
    /// An evaluation batch.
    Eval { x: Tensor, labels: Tensor },
    /// Report evaluation counts and reset them.
    EvalEnd,
    /// Apply every outstanding gradient, then pass on; the last stage reports `Drained`.
    Drain { tag: u64 },
    /// Send a CPU copy of every module's state to the coordinator (after a drain).
    Collect,
}

/// A CPU copy of one module: its stores (EMA twins prefixed `ema.`), its optimizer's momentum
/// buffers by parameter name, and its step count. Also what a stage starts from.
pub struct ModuleSnapshot {
    pub module: usize,
    pub state: ModuleState,
    pub momentum: Vec<(String, Tensor)>,
    pub step: u64,
    /// EMA snapshots received but not yet folded in: (real block, step, parameters).
    pub ema_backlog: Vec<(String, u64, Vec<Tensor>)>,
}

impl ModuleSnapshot {
    /// A fresh module: initial weights, no optimizer state.
    pub fn initial(module: usize, state: ModuleState) -> Self {
        ModuleSnapshot { module, state, momentum: Vec::new(), step: 0, ema_backlog: Vec::new() }
    }

    fn shallow_clone(&self) -> Self {
        let copy = |v: &[(String, Tensor)]| {
            v.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
        };
        ModuleSnapshot {
            module: self.module,
            state: copy(&self.state),
            momentum: copy(&self.momentum),
            step: self.step,
            ema_backlog: self
                .ema_backlog
                .iter()
                .map(|(b, s, p)| (b.clone(), *s, p.iter().map(Tensor::shallow_clone).collect()))
                .collect(),
        }
    }
}

/// Evaluation counts of one module.
#[derive(Debug, Clone, Default)]
pub struct ModuleEval {
    pub module: usize,
    pub correct: i64,
    pub seen: i64,
    /// Σ of per-sample cross-entropy of the final classifier (last module only).
    pub loss_sum: f64,
    pub has_head: bool,
}

/// What stages tell the coordinator.
pub enum Event {
    Window {
        stage: usize,
        window: StageWindow,
        step: u64,
        lr: f64,
        term_losses: Vec<(usize, Vec<f64>)>,
    },
    Eval {
        stage: usize,
        modules: Vec<ModuleEval>,
    },
    Drained {
        tag: u64,
    },
    State {
        stage: usize,
        modules: Vec<ModuleSnapshot>,
    },
    Failed(Failure),
    Exited {
        stage: usize,
        live_bytes: u64,
        peak_live_bytes: u64,
    },
}

/// Why a stage stopped. `secondary` failures are consequences of another stage's (a
/// neighbour disappeared); the coordinator reports a primary one when there is one.
#[derive(Debug)]
pub struct Failure {
    pub stage: usize,
    pub modules: Vec<usize>,
    pub batch: Option<u64>,
    pub cause: TrainError,
    pub secondary: bool,
}

impl Failure {
    fn into_error(self) -> TrainError {
        TrainError::Stage {
            stage: self.stage,
            modules: self.modules,
            batch: self.batch,
            cause: Box::new(self.cause),
        }
    }
}

/// A fault to inject (tests): at `batch`, stage `stage` does `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub stage: usize,
    pub batch: u64,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Error,
    Panic,
    NaN,
    /// The stage drops its channels and returns as if finished.
    CloseChannel,
}

impl std::str::FromStr for Fault {
    type Err = String;
    /// `KIND@STAGE:BATCH`, e.g. `panic@1:5`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad fault `{s}` (KIND@STAGE:BATCH, KIND = error|panic|nan|close)");
        let (kind, at) = s.split_once('@').ok_or_else(bad)?;
        let (stage, batch) = at.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "error" => FaultKind::Error,
            "panic" => FaultKind::Panic,
            "nan" => FaultKind::NaN,
            "close" => FaultKind::CloseChannel,
            _ => return Err(bad()),
        };
        Ok(Fault {
            stage: stage.parse().map_err(|_| bad())?,
            batch: batch.parse().map_err(|_| bad())?,
            kind,
        })
    }
}

/// Everything the stages share.
#[derive(Clone)]
pub struct PipelineSettings {
    pub schedule: Schedule,
    pub in_flight: usize,
    pub optim: OptimConfig,
    pub lr: LrSchedule,
    pub ema_momentum: f64,
    /// How twins pick snapshots (`auto` resolves by `schedule`).
    pub ema_lag: EmaLagRule,
    pub image: ImageSpec,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub log_every: u64,
    pub accumulate: usize,
    pub on_nonfinite: OnNonFinite,
    pub fault: Option<Fault>,
    /// Rebuild module graphs for the backward passes (`pipeline.recompute`).
    pub recompute: bool,
    /// Intra-op threads of each stage thread, by stage (1 where missing).
    pub intra_op_threads: Vec<usize>,
}

/// The lag of the twin in `twin_module` of a block of `source_module` under `rule`.
fn twin_lag(rule: EmaLagRule, twin_module: usize, source_module: usize) -> EmaLag {
    match rule {
        EmaLagRule::Exact => EmaLag::Steps(0),
        EmaLagRule::Distance => EmaLag::Steps((source_module - twin_module) as u64),
        // `Auto` never gets here: `Pipeline::start` resolves it for the schedule.
        EmaLagRule::Latest | EmaLagRule::Auto => EmaLag::Latest,
    }
}

/// A running pipeline.
pub struct Pipeline {
    input: Option<Sender<Forward>>,
    events: Receiver<Event>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pub num_stages: usize,
    pub stage_modules: Vec<std::ops::Range<usize>>,
    drain_tag: u64,
    /// Events received while waiting for something else.
    backlog: VecDeque<Event>,
    failures: Vec<Failure>,
    /// (live, peak live) bytes of each stage when it exited, by stage.
    pub final_bytes: Vec<(u64, u64)>,
}

/// A twin's end of an EMA channel, before its stage has built the twin.
struct TwinWire {
    module: usize,
    block: String,
    rx: Receiver<EmaSnapshot>,
    lag: EmaLag,
}

/// A real block's end of an EMA channel, and the device of the twin it feeds.
struct SourceWire {
    module: usize,
    block: String,
    tx: Sender<EmaSnapshot>,
    to: Device,
}

struct StageContext {
    index: usize,
    modules: std::ops::Range<usize>,
    device: Device,
    next_device: Option<Device>,
    plan: Arc<NetworkPlan>,
    states: Vec<ModuleSnapshot>,
    settings: PipelineSettings,
    input: Receiver<Forward>,
    output: Option<Sender<Forward>>,
    grads_in: Option<Receiver<BackMsg>>,
    grads_out: Option<Sender<BackMsg>>,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    twins: Vec<TwinWire>,
    sources: Vec<SourceWire>,
    queued_bytes: Arc<AtomicU64>,
    next_queued_bytes: Option<Arc<AtomicU64>>,
}

impl Pipeline {
    /// Build and start one thread per stage of `placement` on `devices`.
    pub fn start(
        plan: Arc<NetworkPlan>,
        settings: PipelineSettings,
        states: Vec<ModuleSnapshot>,
        placement: &Placement,
        devices: &[Device],
    ) -> Result<Pipeline, TrainError> {
        let d = placement.num_stages();
        if devices.len() < d {
            return Err(TrainError::TooFewDevices { stages: d, devices: devices.len() });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (ev_tx, ev_rx) = unbounded();
        let cap = settings.in_flight.max(1);
        let fwd: Vec<(Sender<Forward>, Receiver<Forward>)> = (0..d).map(|_| bounded(cap)).collect();
        // Gradient channels are unbounded: their occupancy is bounded by the in-flight limit
        // of the receiving stage, and a bounded one could deadlock against the forward one.
        let back: Vec<(Sender<BackMsg>, Receiver<BackMsg>)> = (1..d).map(|_| unbounded()).collect();
        let queued: Vec<Arc<AtomicU64>> = (0..d).map(|_| Arc::new(AtomicU64::new(0))).collect();

        // EMA wiring: one channel per twin, from the stage owning the real block.
        let mut twins: Vec<Vec<TwinWire>> = (0..d).map(|_| Vec::new()).collect();
        let mut sources: Vec<Vec<SourceWire>> = (0..d).map(|_| Vec::new()).collect();
        let rule = settings.ema_lag.resolve(settings.schedule);
        for c in &plan.chains {
            let (tx, rx) = unbounded();
            let block = format!("layer{}.{}", c.blocks[0].stage, c.blocks[0].index);
            let ts = placement.stage_of(c.step);
            let ss = placement.stage_of(c.ema_source_module);
            twins[ts].push(TwinWire {
                module: c.step,
                block: block.clone(),
                rx,
                lag: twin_lag(rule, c.step, c.ema_source_module),
            });
            sources[ss].push(SourceWire {
                module: c.ema_source_module,
                block,
                tx,
                to: devices[ts],
            });
        }

        let mut handles = Vec::with_capacity(d);
        let mut fwd_rx: Vec<Option<Receiver<Forward>>> =
            fwd.iter().map(|(_, r)| Some(r.clone())).collect();
        let input = fwd[0].0.clone();
        let mut stage_modules = Vec::with_capacity(d);
        for s in (0..d).rev() {
            let modules = placement.groups[s].clone();
            stage_modules.push(modules.clone());
            let ctx = StageContext {
                index: s,
                modules: modules.clone(),
                device: devices[s],
                next_device: (s + 1 < d).then(|| devices[s + 1]),
                plan: plan.clone(),
                states: states[modules.clone()].iter().map(ModuleSnapshot::shallow_clone).collect(),
                settings: settings.clone(),
                input: fwd_rx[s].take().expect("one receiver per stage"),
                output: (s + 1 < d).then(|| fwd[s + 1].0.clone()),
                grads_in: (s + 1 < d).then(|| back[s].1.clone()),
                grads_out: (s > 0).then(|| back[s - 1].0.clone()),
                events: ev_tx.clone(),
                stop: stop.clone(),
                twins: std::mem::take(&mut twins[s]),
                sources: std::mem::take(&mut sources[s]),
                queued_bytes: queued[s].clone(),
                next_queued_bytes: (s + 1 < d).then(|| queued[s + 1].clone()),
            };
            let handle = std::thread::Builder::new()
                .name(format!("stage-{s}"))
                .spawn(move || run_stage(ctx))
                .map_err(|source| TrainError::Spawn { stage: s, source })?;
            handles.push(handle);
        }
        stage_modules.reverse();
        drop(fwd);
        drop(back);
        Ok(Pipeline {
            input: Some(input),
            events: ev_rx,
            handles,
            stop,
            num_stages: d,
            stage_modules,
            drain_tag: 0,
            backlog: VecDeque::new(),
            failures: Vec::new(),
            final_bytes: vec![(0, 0); d],
        })
    }

    /// Send a message to stage 0, noticing failures while it waits.
    pub fn send(&mut self, mut msg: Forward) -> Result<(), TrainError> {
        loop {
            self.check()?;
            let tx = self.input.as_ref().ok_or(TrainError::Stopped)?;
            match tx.send_timeout(msg, POLL) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Timeout(m)) => msg = m,
                Err(SendTimeoutError::Disconnected(_)) => {
                    return Err(self.fail(TrainError::Peer("stage 0 stopped taking input".into())))
                }
            }
        }
    }

    /// Take events that arrived; a failure stops the pipeline and becomes an error.
    fn check(&mut self) -> Result<(), TrainError> {
        while let Ok(ev) = self.events.try_recv() {
            self.note(ev);
        }
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(self.fail(TrainError::Stopped))
        }
    }

    fn note(&mut self, ev: Event) {
        match ev {
            Event::Failed(f) => {
                self.stop.store(true, Ordering::Relaxed);
                self.failures.push(f);
            }
            Event::Exited { stage, live_bytes, peak_live_bytes } => {
                self.final_bytes[stage] = (live_bytes, peak_live_bytes)
            }
            other => self.backlog.push_back(other),
        }
    }

    /// Stop every stage, join them, and return the failure that explains the stop: the first
    /// primary one, else the first reported, else `fallback`.
    fn fail(&mut self, fallback: TrainError) -> TrainError {
        self.stop.store(true, Ordering::Relaxed);
        self.input = None;
        for h in std::mem::take(&mut self.handles) {
            let _ = h.join();
        }
        while let Ok(ev) = self.events.try_recv() {
            self.note(ev);
        }
        let failures = std::mem::take(&mut self.failures);
        let primary = failures.iter().position(|f| !f.secondary).unwrap_or(0);
        failures.into_iter().nth(primary).map_or(fallback, Failure::into_error)
    }

    /// Events other than failures, in arrival order.
    pub fn take_events(&mut self) -> Result<Vec<Event>, TrainError> {
        self.check()?;
        Ok(self.backlog.drain(..).collect())
    }

    /// Wait for one event (other than a failure).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, TrainError> {
        if let Some(e) = self.backlog.pop_front() {
            return Ok(Some(e));
        }
        match self.events.recv_timeout(timeout) {
            Ok(ev) => {
                self.note(ev);
                self.check()?;
                Ok(self.backlog.pop_front())
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.fail(TrainError::Peer("every stage has exited".into())))
            }
        }
    }

    /// Bring every stage to a boundary with no batch in flight and no gradient pending.
    pub fn drain(&mut self) -> Result<Vec<Event>, TrainError> {
        self.drain_tag += 1;
        let tag = self.drain_tag;
        self.send(Forward::Drain { tag })?;
        let mut other = Vec::new();
        loop {
            match self.next_event(POLL)? {
                Some(Event::Drained { tag: t }) if t == tag => return Ok(other),
                Some(e) => other.push(e),
                None => {}
            }
        }
    }

    /// CPU copies of every module, in module order (call after `drain`).
    pub fn collect(&mut self) -> Result<Vec<ModuleSnapshot>, TrainError> {
        self.send(Forward::Collect)?;
        let mut got: Vec<ModuleSnapshot> = Vec::new();
        let mut stages = 0;
        let mut other = Vec::new();
        while stages < self.num_stages {
            match self.next_event(POLL)? {
                Some(Event::State { modules, .. }) => {
                    got.extend(modules);
                    stages += 1;
                }
                Some(e) => other.push(e),
                None => {}
            }
        }
        self.backlog.extend(other);
        got.sort_by_key(|s| s.module);
        Ok(got)
    }

    /// Stop feeding, join every stage, and report the first failure.
    pub fn finish(mut self) -> Result<Vec<(u64, u64)>, TrainError> {
        self.input = None;
        let res = self.join();
        res.map(|_| std::mem::take(&mut self.final_bytes))
    }

    fn join(&mut self) -> Result<(), TrainError> {
        for h in std::mem::take(&mut self.handles) {
            let _ = h.join();
        }
        self.check()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.stop.store(true, Ordering::Relaxed);
            self.input = None;
            let _ = self.join();
        }
    }
}

/// Timers and counters of a stage for the current metrics window.
#[derive(Default)]
struct Clock {
    busy: Duration,
    wait_input: Duration,
    wait_output: Duration,
    wait_grad: Duration,
    start: Option<Instant>,
    batches: u64,
    images: u64,
    peak_live: u64,
    last_lag: u64,
}

fn run_stage(ctx: StageContext) {
    let (index, modules, events, stop) =
        (ctx.index, ctx.modules.clone(), ctx.events.clone(), ctx.stop.clone());
    let current = Arc::new(AtomicU64::new(u64::MAX));
    let cur = current.clone();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        StageWorker::new(ctx, cur).and_then(|mut w| {
            let r = w.run();
            let _ = w.events.send(Event::Exited {
                stage: w.index,
                live_bytes: w.stage.live_bytes(),
                peak_live_bytes: w.peak_live,
            });
            r
        })
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
    let _ = events.send(Event::Failed(Failure {
        stage: index,
        modules: modules.collect(),
        batch,
        cause,
        secondary,
    }));
}

/// The message the last event carried, kept for the actions that work on it.
#[derive(Default)]
struct Inbox {
    train: Option<(Tensor, BatchTargets)>,
    grad: Option<BackMsg>,
    control: Option<Forward>,
}

impl Inbox {
    /// An input message (`None`: the input closed) as the event the schedule sees.
    fn input(&mut self, msg: Option<Forward>) -> StageEvent {
        StageEvent::Input(match msg {
            None => Input::Closed,
            Some(Forward::Train { id, x, targets }) => {
                self.train = Some((x, targets));
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
    device: Device,
    next_device: Option<Device>,
    settings: PipelineSettings,
    input: Receiver<Forward>,
    output: Option<Sender<Forward>>,
    grads_in: Option<Receiver<BackMsg>>,
    grads_out: Option<Sender<BackMsg>>,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    current: Arc<AtomicU64>,
    clock: Clock,
    peak_live: u64,
    mean: Tensor,
    std: Tensor,
    eval: Vec<ModuleEval>,
    queued_bytes: Arc<AtomicU64>,
    next_queued_bytes: Option<Arc<AtomicU64>>,
    last_forward: u64,
}

impl StageWorker {
    fn new(ctx: StageContext, current: Arc<AtomicU64>) -> Result<Self, TrainError> {
        // Intra-op parallelism is configured per thread (OpenMP) and grad mode is per thread.
        tch::set_num_threads(
            ctx.settings.intra_op_threads.get(ctx.index).copied().unwrap_or(1) as i32
        );
        let device = ctx.device;
        let plan = ctx.plan.clone();
        let s = &ctx.settings;
        let mut modules = Vec::with_capacity(ctx.modules.len());
        for (m, start) in ctx.modules.clone().zip(&ctx.states) {
            let nets = build_nets(&plan, m, s.image, device);
            load_state(&nets, &start.state)?;
            let mut module = LocalModule::new(
                nets,
                ModuleSettings {
                    accumulate: s.accumulate,
                    recompute_graph: s.recompute,
                    ema_momentum: s.ema_momentum,
                    stop: ctx.stop.clone(),
                    ..ModuleSettings::for_module(&plan, m, s.lr, s.optim.clone())
                },
            );
            module.restore_optimizer(&start.momentum, start.step)?;
            modules.push(module);
        }
        let first = ctx.modules.start;
        for TwinWire { module: m, block, rx, lag } in ctx.twins {
            let module = &mut modules[m - first];
            let params = block_params(&module.nets.ema_vs.variables(), &block);
            let backlog = ctx.states[m - first]
                .ema_backlog
                .iter()
                .filter(|(b, _, _)| *b == block)
                .map(|(_, step, p)| EmaSnapshot {
                    step: *step,
                    params: p.iter().map(|t| t.to_device(device)).collect(),
                })
                .collect();
            module.twins.push(TwinLink { block, params, rx, lag, backlog });
        }
        for SourceWire { module: m, block, tx, to } in ctx.sources {
            let module = &mut modules[m - first];
            let params = block_params(&module.nets.vs.variables(), &block);
            module.sources.push(SourceLink { block, params, tx, device: to });
        }
        let stage = Stage::new(&plan, modules, device);
        let c = s.image.channels as i64;
        let mean = Tensor::from_slice(&s.mean).view([1, c, 1, 1]).to_device(device);
        let std = Tensor::from_slice(&s.std).view([1, c, 1, 1]).to_device(device);
        Ok(StageWorker {
            index: ctx.index,
            stage,
            device,
            next_device: ctx.next_device,
            settings: ctx.settings,
            input: ctx.input,
            output: ctx.output,
            grads_in: ctx.grads_in,
            grads_out: ctx.grads_out,
            events: ctx.events,
            stop: ctx.stop,
            current,
            clock: Clock::default(),
            peak_live: 0,
            mean,
            std,
            eval: Vec::new(),
            queued_bytes: ctx.queued_bytes,
            next_queued_bytes: ctx.next_queued_bytes,
            last_forward: 0,
        })
    }

    /// The worker loop: wait for what the schedule waits for, hand the event to the
    /// schedule, execute its actions on the message the event carried.
    fn run(&mut self) -> Result<(), TrainError> {
        self.clock.start = Some(Instant::now());
        let mut schedule = self.schedule();
        let mut inbox = Inbox::default();
        loop {
            let event = match schedule.wait() {
                Wait::Input => self.next_input(&mut inbox)?,
                Wait::Grad => {
                    let msg = self.recv_grad()?;
                    inbox.grad(msg)
                }
                Wait::GradOrInput => self.next_grad_or_input(&mut inbox)?,
            };
            let actions = schedule
                .on(event)
                .map_err(|e| TrainError::Protocol(format!("stage {}: {e}", self.index)))?;
            for action in actions {
                if self.execute(action, &mut inbox)? {
                    return Ok(());
                }
            }
            if let StageSchedule::Async(a) = &schedule {
                if a.stored() != self.stage.outstanding() {
                    return Err(TrainError::Protocol(format!(
                        "stage {}: the schedule counts {} stored inputs, the modules {}",
                        self.index,
                        a.stored(),
                        self.stage.outstanding()
                    )));
                }
            }
        }
    }

    /// This stage's schedule (`sequential` is `sync` on one stage).
    fn schedule(&self) -> StageSchedule {
        match self.settings.schedule {
            Schedule::Async => StageSchedule::Async(AsyncSchedule::new(
                self.settings.in_flight,
                self.grads_in.is_some(),
                self.stage.stores_inputs(),
            )),
            Schedule::Sync | Schedule::Sequential => StageSchedule::Sync(SyncSchedule::new(
                self.settings.accumulate,
                self.stage.routes.expects_next,
            )),
        }
    }

    /// Do `action` on what `inbox` holds; `true` when the loop is to end.
    fn execute(&mut self, action: Action, inbox: &mut Inbox) -> Result<bool, TrainError> {
        let missing = |what: &str| TrainError::Protocol(format!("{action:?} without {what}"));
        match action {
            Action::Forward(id) => {
                let (x, targets) = inbox.train.take().ok_or_else(|| missing("a batch"))?;
                self.process_train(id, x, targets)?;
            }
            Action::Sweep(_) => {
                let msg = inbox.grad.take().ok_or_else(|| missing("a gradient"))?;
                self.sweep(msg)?;
            }
            Action::Late(_) => {
                let msg = inbox.grad.take().ok_or_else(|| missing("a gradient"))?;
                self.receive_late(msg)?;
            }
            Action::Step { id, keep_inputs } => self.finish_batch(id, keep_inputs)?,
            Action::Control => {
                let msg = inbox.control.take().ok_or_else(|| missing("a control message"))?;
                self.control(msg)?;
            }
            Action::Exit => return Ok(true),
        }
        Ok(false)
    }

    /// The next input as an event; its tensors or control message wait in `inbox`.
    fn next_input(&mut self, inbox: &mut Inbox) -> Result<StageEvent, TrainError> {
        Ok(inbox.input(self.recv_input()?))
    }

    /// A gradient if one is ready, else whichever of a gradient and an input comes first
    /// (async: late gradients free stored inputs and shorten the lag).
    fn next_grad_or_input(&mut self, inbox: &mut Inbox) -> Result<StageEvent, TrainError> {
        let grads =
            self.grads_in.clone().ok_or(TrainError::Protocol("no gradient channel".into()))?;
        if let Ok(msg) = grads.try_recv() {
            return Ok(inbox.grad(msg));
        }
        let input = self.input.clone();
        let t = Instant::now();
        let event = loop {
            select! {
                recv(grads) -> m => match m {
                    Ok(msg) => break inbox.grad(msg),
                    Err(_) => return Err(TrainError::Peer(format!(
                        "stage {} stopped sending gradients",
                        self.index + 1
                    ))),
                },
                recv(input) -> m => break inbox.input(m.ok()),
                default(POLL) => if self.stop.load(Ordering::Relaxed) {
                    return Err(TrainError::Stopped);
                },
            }
        };
        self.clock.wait_input += t.elapsed();
        Ok(event)
    }

    /// Receive the next forward message; `None` when the input is closed.
    fn recv_input(&mut self) -> Result<Option<Forward>, TrainError> {
        let t = Instant::now();
        let r = loop {
            match self.input.recv_timeout(POLL) {
                Ok(m) => break Some(m),
                Err(RecvTimeoutError::Disconnected) => break None,
                Err(RecvTimeoutError::Timeout) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(TrainError::Stopped);
                    }
                }
            }
        };
        self.clock.wait_input += t.elapsed();
        Ok(r)
    }

    fn recv_grad(&mut self) -> Result<BackMsg, TrainError> {
        let rx =
            self.grads_in.as_ref().ok_or(TrainError::Protocol("no gradient channel".into()))?;
        let t = Instant::now();
        let r = loop {
            match rx.recv_timeout(POLL) {
                Ok(m) => break m,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TrainError::Peer(format!(
                        "stage {} stopped sending gradients",
                        self.index + 1
                    )))
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(TrainError::Stopped);
                    }
                }
            }
        };
        self.clock.wait_grad += t.elapsed();
        Ok(r)
    }

    fn send_forward(&mut self, msg: Forward) -> Result<(), TrainError> {
        let Some(tx) = &self.output else {
            return Ok(());
        };
        let bytes = match &msg {
            Forward::Train { x, .. } | Forward::Eval { x, .. } => bytes_of(x),
            _ => 0,
        };
        let t = Instant::now();
        let mut msg = msg;
        loop {
            match tx.send_timeout(msg, POLL) {
                Ok(()) => break,
                Err(SendTimeoutError::Timeout(m)) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(TrainError::Stopped);
                    }
                    msg = m;
                }
                Err(SendTimeoutError::Disconnected(_)) => {
                    return Err(TrainError::Peer(format!(
                        "stage {} stopped taking input",
                        self.index + 1
                    )))
                }
            }
        }
        if let Some(q) = &self.next_queued_bytes {
            q.fetch_add(bytes, Ordering::Relaxed);
        }
        self.clock.wait_output += t.elapsed();
        Ok(())
    }

    fn send_back(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let tx = self.grads_out.as_ref().ok_or(TrainError::Protocol("no previous stage".into()))?;
        tx.send(msg).map_err(|_| {
            TrainError::Peer(format!("stage {} stopped taking gradients", self.index - 1))
        })
    }

    /// Normalise raw images on stage 0.
    fn stage_input(&self, x: Tensor) -> Tensor {
        if self.stage.first_module() == 0 {
            // Non-blocking: asynchronous from pinned memory, ordered before the ops that use
            // it on the device's stream (and a plain copy from pageable memory).
            let x = x.to_device_(self.device, x.kind(), true, false);
            (x.to_kind(Kind::Float) / 255.0 - &self.mean) / &self.std
        } else {
            x.to_device(self.device)
        }
    }

    fn inject(&mut self, id: u64, x: Tensor) -> Result<Tensor, TrainError> {
        match self.settings.fault {
            Some(f) if f.stage == self.index && f.batch == id => match f.kind {
                FaultKind::Error => Err(TrainError::Injected(id)),
                FaultKind::Panic => panic!("injected panic at batch {id}"),
                FaultKind::NaN => Ok(x * f64::NAN),
                FaultKind::CloseChannel => {
                    self.output = None;
                    self.grads_out = None;
                    self.grads_in = None;
                    Err(TrainError::Stopped)
                }
            },
            _ => Ok(x),
        }
    }

    /// Forward, local losses and early sweep of a training batch; sends the output on.
    fn process_train(
        &mut self,
        id: u64,
        x: Tensor,
        targets: BatchTargets,
    ) -> Result<(), TrainError> {
        self.current.store(id, Ordering::Relaxed);
        let in_bytes = bytes_of(&x);
        self.queued_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(in_bytes))
            })
            .ok();
        let t = Instant::now();
        let x = self.stage_input(x);
        let x = self.inject(id, x)?;
        let targets = targets.to_device(self.device);
        let (h, early) = self.stage.process(id, &x, &targets)?;
        self.note_live();
        self.clock.busy += t.elapsed();
        if let Some(next) = self.next_device {
            let t = Instant::now();
            let msg = Forward::Train { id, x: h.to_device(next), targets: targets.to_device(next) };
            self.clock.busy += t.elapsed();
            self.send_forward(msg)?;
        }
        let r = self.stage.routes;
        match early {
            Some(msg) => self.send_back(msg)?,
            None if r.prev_expects && !r.next_passes_through => {
                self.send_back(BackMsg { id, parts: Vec::new(), last: true })?
            }
            None => {}
        }
        self.last_forward = id;
        self.clock.batches += 1;
        self.clock.images += targets.labels.size()[0] as u64;
        Ok(())
    }

    fn finish_batch(&mut self, id: u64, keep_inputs: bool) -> Result<(), TrainError> {
        let t = Instant::now();
        self.stage.finish(id, keep_inputs)?;
        self.note_live();
        self.clock.busy += t.elapsed();
        self.maybe_report()
    }

    /// A gradient message for a batch still pending (sync).
    fn sweep(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let t = Instant::now();
        let out = self.stage.receive(msg.id, msg.parts)?;
        self.note_live();
        self.clock.busy += t.elapsed();
        if self.stage.routes.next_passes_through && (!out.is_empty() || msg.last) {
            self.send_back(BackMsg { id: msg.id, parts: out, last: msg.last })?;
        }
        Ok(())
    }

    /// A gradient message for a finished batch (async).
    fn receive_late(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let t = Instant::now();
        self.clock.last_lag = self.last_forward.saturating_sub(msg.id);
        let out = self.stage.late(msg.id, msg.parts, msg.last)?;
        self.note_live();
        self.clock.busy += t.elapsed();
        if self.stage.routes.next_passes_through && (!out.is_empty() || msg.last) {
            self.send_back(BackMsg { id: msg.id, parts: out, last: msg.last })?;
        }
        Ok(())
    }

    /// Evaluation and drain messages (no training batch in flight here).
    fn control(&mut self, msg: Forward) -> Result<(), TrainError> {
        match msg {
            Forward::Train { .. } => unreachable!("handled by the schedules"),
            Forward::Eval { x, labels } => {
                let t = Instant::now();
                let x = self.stage_input(x);
                let labels = labels.to_device(self.device);
                let h = tch::no_grad(|| self.evaluate(&x, &labels));
                self.clock.busy += t.elapsed();
                if let Some(next) = self.next_device {
                    self.send_forward(Forward::Eval {
                        x: h.to_device(next),
                        labels: labels.to_device(next),
                    })?;
                }
            }
            Forward::EvalEnd => {
                let modules = std::mem::take(&mut self.eval);
                let _ = self.events.send(Event::Eval { stage: self.index, modules });
                self.send_forward(Forward::EvalEnd)?;
            }
            Forward::Collect => {
                let modules =
                    self.stage.modules.iter_mut().map(snapshot).collect::<Result<Vec<_>, _>>()?;
                let _ = self.events.send(Event::State { stage: self.index, modules });
                self.send_forward(Forward::Collect)?;
            }
            Forward::Drain { tag } => {
                self.maybe_report_now()?;
                if self.output.is_some() {
                    self.send_forward(Forward::Drain { tag })?;
                } else {
                    let _ = self.events.send(Event::Drained { tag });
                }
            }
        }
        Ok(())
    }

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
        self.clock.peak_live = self.clock.peak_live.max(peak);
        self.peak_live = self.peak_live.max(peak);
    }

    fn maybe_report(&mut self) -> Result<(), TrainError> {
        let step = self.stage.modules[0].step;
        if step > 0 && step % self.settings.log_every == 0 && self.clock.batches > 0 {
            self.maybe_report_now()?;
        }
        Ok(())
    }

    /// Send the current window's metrics to the coordinator and start a new window.
    fn maybe_report_now(&mut self) -> Result<(), TrainError> {
        if self.clock.batches == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let wall = now - self.clock.start.unwrap_or(now);
        let c = std::mem::take(&mut self.clock);
        let term_losses = self
            .stage
            .modules
            .iter_mut()
            .map(|m| {
                let l = m
                    .stats
                    .iter()
                    .map(|s| if s.batches > 0 { s.loss_sum / s.batches as f64 } else { f64::NAN })
                    .collect();
                m.stats.iter_mut().for_each(|s| *s = Default::default());
                (m.index, l)
            })
            .collect();
        let window = StageWindow {
            stage: self.index,
            device: format!("{:?}", self.device),
            modules: self.stage.modules.iter().map(|m| m.index).collect(),
            batches: c.batches,
            images: c.images,
            images_per_s: c.images as f64 / wall.as_secs_f64().max(1e-9),
            busy_ms: c.busy.as_secs_f64() * 1e3,
            wait_input_ms: c.wait_input.as_secs_f64() * 1e3,
            wait_output_ms: c.wait_output.as_secs_f64() * 1e3,
            wait_grad_ms: c.wait_grad.as_secs_f64() * 1e3,
            wall_ms: wall.as_secs_f64() * 1e3,
            queue_depth: self.input.len(),
            grad_lag: c.last_lag,
            live_bytes: self.stage.live_bytes() + self.queued_bytes.load(Ordering::Relaxed),
            peak_live_bytes: c.peak_live,
            loss: Vec::new(),
        };
        let step = self.stage.modules[0].step;
        let lr = self.settings.lr.at(step.saturating_sub(1));
        self.clock.start = Some(now);
        self.events
            .send(Event::Window { stage: self.index, window, step, lr, term_losses })
            .map_err(|_| TrainError::Stopped)
    }
}

fn snapshot(m: &mut LocalModule) -> Result<ModuleSnapshot, TrainError> {
    let cpu = |t: &Tensor| t.f_to_device_(Device::Cpu, t.kind(), false, true);
    let state = m
        .nets
        .state()
        .iter()
        .map(|(n, t)| Ok((n.clone(), cpu(t)?)))
        .collect::<Result<_, TrainError>>()?;
    let opt = m.optimizer();
    let momentum = opt
        .params
        .iter()
        .zip(&opt.momentum_buffers)
        .filter_map(|((n, _), b)| b.as_ref().map(|b| Ok((n.clone(), cpu(b)?))))
        .collect::<Result<_, TrainError>>()?;
    let mut ema_backlog = Vec::new();
    for t in m.twins.iter_mut() {
        t.absorb();
        for snap in &t.backlog {
            let params = snap.params.iter().map(cpu).collect::<Result<Vec<_>, _>>()?;
            ema_backlog.push((t.block.clone(), snap.step, params));
        }
    }
    Ok(ModuleSnapshot { module: m.index, state, momentum, step: m.step, ema_backlog })
}

/// Trainable parameters of block `block` (e.g. `layer3.0`) in a store, sorted by name.
fn block_params(vars: &HashMap<String, Tensor>, block: &str) -> Vec<Tensor> {
    let prefix = format!("{block}.");
    let mut v: Vec<(&String, &Tensor)> =
        vars.iter().filter(|(n, _)| n.starts_with(&prefix) && !n.contains("running_")).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, t)| t.shallow_clone()).collect()
}

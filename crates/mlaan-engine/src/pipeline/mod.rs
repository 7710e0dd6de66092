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
//! neighbours see the disconnection and stop; the coordinator joins every thread. Under
//! `on_nonfinite = "skip"` a non-finite loss is not a failure: the stage reports
//! `Event::Skipped` and the batch goes on as `Forward::Skip`, dropped by every later module.
//!
//! Files: [`settings`] (what every stage shares), [`wiring`] (building a stage, EMA
//! channels), [`port`] (every blocking channel operation), [`worker`] (the stage loop),
//! [`window`] (metrics windows), [`faults`] (drills); this file is the coordinator's handle.
//! What flows is `crate::wire`'s.

pub mod faults;
pub mod port;
pub mod settings;
pub mod window;
pub mod wiring;
pub mod worker;

pub use faults::{Fault, FaultKind};
pub use settings::{ComputeSettings, PipelineSettings};

use crate::error::TrainError;
use crate::stage::memory::Queued;
use crate::wire::{BackMsg, Event, Failure, Forward, Handed, ModuleEval, ModuleSnapshot};
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use mlaan_core::placement::Placement;
use mlaan_core::plan::NetworkPlan;
use port::{Port, POLL};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tch::Device;
use wiring::{build_stage, EmaWires};
use worker::{run_stage, WorkerParts};

/// A running pipeline.
pub struct Pipeline {
    input: Option<Sender<Handed<Forward>>>,
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

impl Pipeline {
    /// Build and start one thread per stage of `placement` on `devices`. Each stage builds
    /// its modules on its own thread (intra-op threads and grad mode are per thread).
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
        type Channel<T> = (Sender<Handed<T>>, Receiver<Handed<T>>);
        let fwd: Vec<Channel<Forward>> = (0..d).map(|_| bounded(cap)).collect();
        // Gradient channels are unbounded: their occupancy is bounded by the in-flight limit
        // of the receiving stage, and a bounded one could deadlock against the forward one.
        let back: Vec<Channel<BackMsg>> = (1..d).map(|_| unbounded()).collect();
        let queued: Vec<Queued> = (0..d).map(|_| Queued::default()).collect();
        let rule = settings.ema_lag.resolve(settings.schedule);
        let EmaWires { mut twins, mut sources } = EmaWires::new(&plan, placement, devices, rule);

        let mut handles = Vec::with_capacity(d);
        for s in 0..d {
            let modules = placement.groups[s].clone();
            let mut port = Port::new(
                s,
                fwd[s].1.clone(),
                (s + 1 < d).then(|| fwd[s + 1].0.clone()),
                (s + 1 < d).then(|| back[s].1.clone()),
                (s > 0).then(|| back[s - 1].0.clone()),
                stop.clone(),
                (s + 1 < d).then(|| queued[s + 1].clone()),
            );
            port.per_stage_streams = settings.per_stage_streams(devices[s]);
            port.device = devices[s];
            let states: Vec<ModuleSnapshot> =
                states[modules.clone()].iter().map(ModuleSnapshot::shallow_clone).collect();
            let (plan, settings, events) = (plan.clone(), settings.clone(), ev_tx.clone());
            let (twins, sources) = (std::mem::take(&mut twins[s]), std::mem::take(&mut sources[s]));
            let (device, queued) = (devices[s], queued[s].clone());
            let build = move || {
                tch::set_num_threads(settings.intra_op_threads.get(s).copied().unwrap_or(1) as i32);
                settings.compute.enter_stage_thread(device)?;
                let mut stage = build_stage(&plan, &settings, &states, device, twins, sources)?;
                stage.memory.queued = queued;
                Ok(WorkerParts { index: s, stage, settings, port, events })
            };
            let (events, stop) = (ev_tx.clone(), stop.clone());
            let module_list: Vec<usize> = modules.clone().collect();
            let handle = std::thread::Builder::new()
                .name(format!("stage-{s}"))
                .spawn(move || run_stage(build, s, module_list, events, stop))
                .map_err(|source| TrainError::Spawn { stage: s, source })?;
            handles.push(handle);
        }
        let input = fwd[0].0.clone();
        drop(fwd);
        drop(back);
        Ok(Pipeline {
            input: Some(input),
            events: ev_rx,
            handles,
            stop,
            num_stages: d,
            stage_modules: placement.groups.clone(),
            drain_tag: 0,
            backlog: VecDeque::new(),
            failures: Vec::new(),
            final_bytes: vec![(0, 0); d],
        })
    }

    /// Send a message to stage 0, noticing failures while it waits.
    pub fn send(&mut self, msg: Forward) -> Result<(), TrainError> {
        // The coordinator's batches are host tensors: nothing to order on a device.
        let mut msg = Handed::bare(msg);
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

    /// Wait for one event per stage that `wanted` picks; every other event stays queued, in
    /// order, for `take_events`.
    fn gather(&mut self, wanted: impl Fn(&Event) -> bool) -> Result<Vec<Event>, TrainError> {
        let mut got = Vec::with_capacity(self.num_stages);
        let mut other = VecDeque::new();
        while got.len() < self.num_stages {
            let Some(ev) = self.next_event(POLL)? else { continue };
            if wanted(&ev) {
                got.push(ev);
            } else {
                other.push_back(ev);
            }
        }
        other.extend(self.backlog.drain(..));
        self.backlog = other;
        Ok(got)
    }

    /// Bring every stage to a boundary with no batch in flight and no gradient pending.
    /// Returns the events that arrived meanwhile.
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
        let per_stage = self.gather(|ev| matches!(ev, Event::State { .. }))?;
        let mut got: Vec<ModuleSnapshot> = per_stage
            .into_iter()
            .flat_map(|ev| match ev {
                Event::State { modules, .. } => modules,
                _ => unreachable!("gathered"),
            })
            .collect();
        got.sort_by_key(|s| s.module);
        Ok(got)
    }

    /// Every replica takes rank 0's module buffers (before a sharded evaluation; call after
    /// `drain`, on every rank). Messages keep their order, so evaluation batches sent after
    /// this see the new buffers.
    pub fn take_rank0_buffers(&mut self) -> Result<(), TrainError> {
        self.send(Forward::TakeRank0Buffers)
    }

    /// End an evaluation (after the `Forward::Eval` batches): every module's counts.
    pub fn end_eval(&mut self) -> Result<Vec<ModuleEval>, TrainError> {
        self.send(Forward::EvalEnd)?;
        let per_stage = self.gather(|ev| matches!(ev, Event::Eval { .. }))?;
        Ok(per_stage
            .into_iter()
            .flat_map(|ev| match ev {
                Event::Eval { modules, .. } => modules,
                _ => unreachable!("gathered"),
            })
            .collect())
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

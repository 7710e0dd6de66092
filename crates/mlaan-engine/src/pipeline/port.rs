//! One port for every blocking channel operation of a stage worker. Each wait polls the
//! pipeline's stop flag at one interval, [`POLL`], so a stopped pipeline is noticed within it
//! and an idle worker wakes no more often; each wait is timed into [`Waits`] for the
//! metrics window; a neighbour that went away becomes [`TrainError::Peer`], a stop
//! [`TrainError::Stopped`].

use crate::bytes_of;
use crate::error::TrainError;
use crate::stage::memory::Queued;
use crate::wire::{BackMsg, EmaSnapshot, Forward, Handed};
use crossbeam_channel::{select, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blocked channel operation looks at the stop flag.
pub const POLL: Duration = Duration::from_millis(50);

/// Time spent blocked, by what was waited for, since the last [`Port::take_waits`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Waits {
    pub input: Duration,
    pub output: Duration,
    /// Gradients from the next stage, and EMA snapshots of a later stage's step.
    pub grad: Duration,
}

/// What [`Port::recv_grad_or_input`] got.
pub enum Received {
    Grad(BackMsg),
    /// An input message; `None` when the input is closed.
    Input(Option<Forward>),
}

/// A stage's channels: input from the previous stage (or the coordinator), output to the
/// next, gradients from the next and to the previous.
pub struct Port {
    pub stage: usize,
    pub input: Receiver<Handed<Forward>>,
    pub output: Option<Sender<Handed<Forward>>>,
    pub grads_in: Option<Receiver<Handed<BackMsg>>>,
    pub grads_out: Option<Sender<Handed<BackMsg>>>,
    pub stop: Arc<AtomicBool>,
    /// The next stage's count of bytes queued for it (its memory counts them).
    pub next_queued: Option<Queued>,
    /// Stages compute on their own CUDA streams: what is sent carries an event.
    pub per_stage_streams: bool,
    /// The stage's device: everything received lands there (`Handed::receive`).
    pub device: tch::Device,
    waits: Waits,
}

impl Port {
    pub fn new(
        stage: usize,
        input: Receiver<Handed<Forward>>,
        output: Option<Sender<Handed<Forward>>>,
        grads_in: Option<Receiver<Handed<BackMsg>>>,
        grads_out: Option<Sender<Handed<BackMsg>>>,
        stop: Arc<AtomicBool>,
        next_queued: Option<Queued>,
    ) -> Self {
        let waits = Waits::default();
        Port {
            stage,
            input,
            output,
            grads_in,
            grads_out,
            stop,
            next_queued,
            per_stage_streams: false,
            device: tch::Device::Cpu,
            waits,
        }
    }

    /// The waits since the last call; reset.
    pub fn take_waits(&mut self) -> Waits {
        std::mem::take(&mut self.waits)
    }

    /// The next forward message; `None` when the input is closed.
    pub fn recv_input(&mut self) -> Result<Option<Forward>, TrainError> {
        let t = Instant::now();
        let device = self.device;
        let msg = self.recv(&self.input)?.map(|m| m.receive(device)).transpose()?;
        self.waits.input += t.elapsed();
        Ok(msg)
    }

    /// The next gradient message from the next stage.
    pub fn recv_grad(&mut self) -> Result<BackMsg, TrainError> {
        let rx = self.grads()?;
        let t = Instant::now();
        let msg = self.recv(&rx)?.ok_or_else(|| self.peer_gone("stopped sending gradients"))?;
        self.waits.grad += t.elapsed();
        msg.receive(self.device)
    }

    /// A gradient if one is ready, else whichever of a gradient and an input comes first.
    pub fn recv_grad_or_input(&mut self) -> Result<Received, TrainError> {
        let grads = self.grads()?;
        if let Ok(msg) = grads.try_recv() {
            return Ok(Received::Grad(msg.receive(self.device)?));
        }
        let input = self.input.clone();
        let t = Instant::now();
        let got = loop {
            select! {
                recv(grads) -> m => match m {
                    Ok(msg) => break Received::Grad(msg.receive(self.device)?),
                    Err(_) => return Err(self.peer_gone("stopped sending gradients")),
                },
                recv(input) -> m => {
                    break Received::Input(m.ok().map(|m| m.receive(self.device)).transpose()?)
                }
                default(POLL) => self.check_stop()?,
            }
        };
        self.waits.input += t.elapsed();
        Ok(got)
    }

    /// An EMA snapshot a twin waits for: a later stage's step on an earlier batch.
    pub fn recv_ema(
        &mut self,
        rx: &Receiver<Handed<EmaSnapshot>>,
    ) -> Result<EmaSnapshot, TrainError> {
        let t = Instant::now();
        // The publishing stage closed its end: it has stopped, and so does this one.
        let snap = self.recv(rx)?.ok_or(TrainError::Stopped)?;
        self.waits.grad += t.elapsed();
        snap.receive(self.device)
    }

    /// Send `msg` to the next stage (nothing when this is the last stage).
    pub fn send_forward(&mut self, msg: Forward) -> Result<(), TrainError> {
        let Some(tx) = self.output.clone() else { return Ok(()) };
        let bytes = match &msg {
            Forward::Train { x, .. } | Forward::Eval { x, .. } => bytes_of(x),
            _ => 0,
        };
        let t = Instant::now();
        let mut msg = Handed::send(msg, self.per_stage_streams)?;
        loop {
            match tx.send_timeout(msg, POLL) {
                Ok(()) => break,
                Err(SendTimeoutError::Timeout(m)) => {
                    self.check_stop()?;
                    msg = m;
                }
                Err(SendTimeoutError::Disconnected(_)) => {
                    return Err(TrainError::Peer(format!(
                        "stage {} stopped taking input",
                        self.stage + 1
                    )))
                }
            }
        }
        if let Some(q) = &self.next_queued {
            q.add(bytes);
        }
        self.waits.output += t.elapsed();
        Ok(())
    }

    /// Send gradient parts to the previous stage (its channel is unbounded: never blocks).
    pub fn send_back(&mut self, msg: BackMsg) -> Result<(), TrainError> {
        let tx = self.grads_out.as_ref().ok_or(TrainError::Protocol("no previous stage".into()))?;
        tx.send(Handed::send(msg, self.per_stage_streams)?).map_err(|_| {
            TrainError::Peer(format!("stage {} stopped taking gradients", self.stage - 1))
        })
    }

    /// Drop every channel but the input, as a stage that died would (fault drills).
    pub fn close(&mut self) {
        self.output = None;
        self.grads_out = None;
        self.grads_in = None;
    }

    /// Wait for a message on `rx`, looking at the stop flag every [`POLL`]; `None` when the
    /// sender has gone.
    fn recv<T>(&self, rx: &Receiver<T>) -> Result<Option<T>, TrainError> {
        loop {
            match rx.recv_timeout(POLL) {
                Ok(m) => return Ok(Some(m)),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => self.check_stop()?,
            }
        }
    }

    fn check_stop(&self) -> Result<(), TrainError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(TrainError::Stopped)
        } else {
            Ok(())
        }
    }

    fn grads(&self) -> Result<Receiver<Handed<BackMsg>>, TrainError> {
        self.grads_in.clone().ok_or(TrainError::Protocol("no gradient channel".into()))
    }

    fn peer_gone(&self, what: &str) -> TrainError {
        TrainError::Peer(format!("stage {} {what}", self.stage + 1))
    }
}

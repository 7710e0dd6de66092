//! A module's EMA links: the real blocks it publishes after every optimizer step, and the
//! twins it folds snapshots into. Folding never blocks: a twin whose exact snapshot has not
//! arrived yet stays *due*, and the module's owner (the stage worker, through its port) waits
//! on [`EmaLinks::awaited`] and hands the snapshot in with [`EmaLinks::deliver`].

use crate::error::TrainError;
use crate::wire::{EmaSnapshot, Handed};
use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use tch::{Device, Tensor};

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
    pub rx: Receiver<Handed<EmaSnapshot>>,
    pub lag: EmaLag,
    /// Snapshots received but not yet folded in, oldest first. They are part of the twin's
    /// state: a checkpoint saves them, so that a lagged twin resumes exactly.
    pub backlog: VecDeque<EmaSnapshot>,
    /// The twin's device, where its snapshots land.
    pub device: Device,
}

impl TwinLink {
    /// Move every snapshot that has arrived into the backlog.
    pub fn absorb(&mut self) -> Result<(), TrainError> {
        for snap in self.rx.try_iter() {
            self.backlog.push_back(snap.receive(self.device)?);
        }
        Ok(())
    }
}

/// The publishing end: the real block's parameters and a subscriber on `device`.
pub struct SourceLink {
    pub block: String,
    pub params: Vec<Tensor>,
    pub tx: Sender<Handed<EmaSnapshot>>,
    pub device: Device,
    /// Stages compute on their own CUDA streams: a snapshot carries an event.
    pub per_stage_streams: bool,
}

pub struct EmaLinks {
    module: usize,
    momentum: f64,
    pub twins: Vec<TwinLink>,
    pub sources: Vec<SourceLink>,
    /// (twin, snapshot step) still to fold, in step order per twin.
    due: VecDeque<(usize, u64)>,
}

impl EmaLinks {
    pub fn new(module: usize, momentum: f64) -> Self {
        EmaLinks { module, momentum, twins: Vec::new(), sources: Vec::new(), due: VecDeque::new() }
    }

    /// After optimizer step `step`: publish every real block, then fold into every twin what
    /// its lag asks for, as far as it has arrived.
    pub fn after_step(&mut self, step: u64) -> Result<(), TrainError> {
        for s in &self.sources {
            let params = s
                .params
                .iter()
                .map(|p| p.f_to_device_(s.device, p.kind(), false, true))
                .collect::<Result<Vec<_>, _>>()?;
            // A closed subscriber means its stage is gone; the pipeline is stopping.
            let _ = s.tx.send(Handed::send(EmaSnapshot { step, params }, s.per_stage_streams)?);
        }
        for t in 0..self.twins.len() {
            match self.twins[t].lag {
                EmaLag::Latest => {
                    let link = &mut self.twins[t];
                    link.absorb()?;
                    let last = link.backlog.pop_back();
                    link.backlog.clear();
                    if let Some(snap) = last {
                        self.fold(t, snap)?;
                    }
                }
                EmaLag::Steps(lag) if step >= lag => self.due.push_back((t, step - lag)),
                EmaLag::Steps(_) => {}
            }
        }
        self.fold_due()
    }

    /// The twin waiting for a snapshot that has not arrived, and the channel it comes on.
    pub fn awaited(&self) -> Option<(usize, &Receiver<Handed<EmaSnapshot>>)> {
        self.due.front().map(|&(t, _)| (t, &self.twins[t].rx))
    }

    /// A snapshot received for twin `t` while waiting: fold what is now complete.
    pub fn deliver(&mut self, t: usize, snap: EmaSnapshot) -> Result<(), TrainError> {
        self.twins[t].backlog.push_back(snap);
        self.fold_due()
    }

    /// Fold due snapshots in order until one is missing.
    fn fold_due(&mut self) -> Result<(), TrainError> {
        while let Some(&(t, want)) = self.due.front() {
            let link = &mut self.twins[t];
            link.absorb()?;
            while link.backlog.front().is_some_and(|s| s.step < want) {
                link.backlog.pop_front();
            }
            let Some(front) = link.backlog.front() else { return Ok(()) };
            if front.step > want {
                return Err(TrainError::Protocol(format!(
                    "module {}: EMA twin of {} wanted step {want}, got {}",
                    self.module, link.block, front.step
                )));
            }
            let snap = link.backlog.pop_front().expect("front exists");
            self.due.pop_front();
            self.fold(t, snap)?;
        }
        Ok(())
    }

    fn fold(&self, t: usize, snap: EmaSnapshot) -> Result<(), TrainError> {
        let pairs: Vec<(Tensor, Tensor)> = self.twins[t]
            .params
            .iter()
            .zip(snap.params)
            .map(|(e, r)| (e.shallow_clone(), r))
            .collect();
        Ok(mlaan_models::lam::ema_update(&pairs, self.momentum)?)
    }

    /// Snapshots received and not folded in, by twin block, as host copies: (block, step,
    /// parameters). They are part of the twins' state (a lagged twin needs them to resume).
    pub fn save_backlog(&mut self) -> Result<Vec<(String, u64, Vec<Tensor>)>, TrainError> {
        let mut out = Vec::new();
        for t in self.twins.iter_mut() {
            t.absorb()?;
            for snap in &t.backlog {
                let params =
                    snap.params.iter().map(crate::optim::to_host).collect::<Result<_, _>>()?;
                out.push((t.block.clone(), snap.step, params));
            }
        }
        Ok(out)
    }

    /// Back from [`EmaLinks::save_backlog`]: each twin takes the snapshots of its block, on
    /// its device, after any it already holds.
    pub fn restore_backlog(
        &mut self,
        saved: &[(String, u64, Vec<Tensor>)],
    ) -> Result<(), TrainError> {
        for t in self.twins.iter_mut() {
            for (_, step, params) in saved.iter().filter(|(b, _, _)| *b == t.block) {
                let params = params
                    .iter()
                    .map(|p| p.f_to_device(t.device))
                    .collect::<Result<Vec<_>, _>>()?;
                t.backlog.push_back(EmaSnapshot { step: *step, params });
            }
        }
        Ok(())
    }
}

//! The batches a module is working on: each one's input, output, graph and gradient parts
//! between its forward and its parameter pass, and (async) the inputs kept after that for late
//! gradients, with what they weigh. A batch dropped for a non-finite loss stays as a
//! tombstone, so that every later operation on it is a no-op rather than a protocol error.

use crate::module::{BatchTargets, GradPart};
use crate::{bytes_of, TrainError};
use std::collections::BTreeMap;
use tch::Tensor;

/// State of a batch between its forward and its `finish`.
pub struct Pending {
    pub x: Tensor,
    pub h: Tensor,
    pub targets: BatchTargets,
    /// Σ of every gradient part on h (for the parameter pass).
    pub g_params: Option<Tensor>,
    /// Parts with reach left ≥ 1 not yet propagated to the input, by reach.
    pub g_unsent: BTreeMap<usize, Tensor>,
    pub graph_bytes: u64,
    /// Whether `h` carries its autograd graph (not yet, in recompute mode).
    pub has_graph: bool,
    /// Running statistics before the forward, when the batch may be dropped.
    pub stats_before: Option<Vec<Tensor>>,
}

impl Pending {
    pub fn new(
        x: Tensor,
        h: Tensor,
        targets: BatchTargets,
        graph_bytes: u64,
        has_graph: bool,
    ) -> Self {
        Pending {
            x,
            h,
            targets,
            g_params: None,
            g_unsent: BTreeMap::new(),
            graph_bytes,
            has_graph,
            stats_before: None,
        }
    }

    /// Input, output, graph and gradients of the batch.
    pub fn bytes(&self) -> u64 {
        bytes_of(&self.x)
            + bytes_of(&self.h)
            + self.graph_bytes
            + self.g_params.as_ref().map_or(0, bytes_of)
            + self.g_unsent.values().map(bytes_of).sum::<u64>()
            + self.stats_before.iter().flatten().map(bytes_of).sum::<u64>()
    }

    /// Add gradient parts on h: all of them to the parameter pass, those that reach further
    /// back (and can: `has_input_grad`) to the unsent parts by reach.
    pub fn add(&mut self, parts: Vec<GradPart>, has_input_grad: bool) -> Result<(), TrainError> {
        for part in parts {
            if part.reach_left >= 1 && has_input_grad {
                let mut acc = self.g_unsent.remove(&part.reach_left);
                crate::module::grads::add_into(&mut acc, part.grad.shallow_clone())?;
                self.g_unsent.insert(part.reach_left, acc.expect("just set"));
            }
            crate::module::grads::add_into(&mut self.g_params, part.grad)?;
        }
        Ok(())
    }
}

/// A batch in progress: being worked on, or dropped.
pub enum Entry {
    Live(Pending),
    Dropped,
}

/// An input kept after `finish` for late gradients (async), or the tombstone of a dropped
/// batch that still awaits its last message.
pub enum Kept {
    Input(Tensor, BatchTargets),
    Dropped,
}

#[derive(Default)]
pub struct InFlight {
    pending: BTreeMap<u64, Entry>,
    kept: BTreeMap<u64, Kept>,
}

impl InFlight {
    pub fn begin(&mut self, id: u64, p: Pending) {
        self.pending.insert(id, Entry::Live(p));
    }

    /// Batch `id` is dropped: what it held is freed; later calls on it do nothing.
    pub fn drop_batch(&mut self, id: u64) {
        self.pending.insert(id, Entry::Dropped);
    }

    pub fn entry(&self, id: u64) -> Option<&Entry> {
        self.pending.get(&id)
    }

    pub fn entry_mut(&mut self, id: u64) -> Option<&mut Entry> {
        self.pending.get_mut(&id)
    }

    pub fn take(&mut self, id: u64) -> Option<Entry> {
        self.pending.remove(&id)
    }

    pub fn keep(&mut self, id: u64, kept: Kept) {
        self.kept.insert(id, kept);
    }

    pub fn take_kept(&mut self, id: u64) -> Option<Kept> {
        self.kept.remove(&id)
    }

    pub fn kept_count(&self) -> usize {
        self.kept.len()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Bytes of every batch in progress and every kept input.
    pub fn bytes(&self) -> u64 {
        let pending: u64 = self
            .pending
            .values()
            .map(|e| match e {
                Entry::Live(p) => p.bytes(),
                Entry::Dropped => 0,
            })
            .sum();
        let kept: u64 = self
            .kept
            .values()
            .map(|k| match k {
                Kept::Input(x, t) => bytes_of(x) + bytes_of(&t.labels),
                Kept::Dropped => 0,
            })
            .sum();
        pending + kept
    }
}

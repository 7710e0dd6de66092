//! The batches a module is working on: each one's input, output, graph and gradient parts
//! between its forward and its parameter pass, and (async) the inputs kept after that for late
//! gradients, with what they weigh. A batch dropped for a non-finite loss stays as a
//! tombstone, so that every later operation on it is a no-op rather than a protocol error.

use crate::bytes_of;
use crate::error::TrainError;
use crate::wire::{BatchTargets, GradPart};
use std::collections::BTreeMap;
use tch::Tensor;

/// State of a batch between its forward and its `finish`.
pub struct Pending {
    pub x: Tensor,
    pub h: Tensor,
    pub targets: BatchTargets,
    /// Every gradient part on h, with its reach left, for the parameter pass; summed by
    /// [`Pending::param_grad`] in a fixed order (see there).
    pub param_parts: Vec<(usize, Tensor)>,
    /// Parts with reach left ≥ 1 not yet propagated to the input, by reach (summed when
    /// taken, see [`Pending::take_unsent`]).
    pub g_unsent: BTreeMap<usize, Vec<Tensor>>,
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
            param_parts: Vec::new(),
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
            + self.param_parts.iter().map(|(_, g)| bytes_of(g)).sum::<u64>()
            + self.g_unsent.values().flatten().map(bytes_of).sum::<u64>()
            + self.stats_before.iter().flatten().map(bytes_of).sum::<u64>()
    }

    /// Add gradient parts on h: all of them to the parameter pass, those that reach further
    /// back (and can: `has_input_grad`) to the unsent parts by reach.
    pub fn add(&mut self, parts: Vec<GradPart>, has_input_grad: bool) -> Result<(), TrainError> {
        // Parts are kept as they came and summed into fresh tensors when used: a part may
        // sit both here and in the unsent parts, so adding into it in place would corrupt
        // the other.
        for part in parts {
            if part.reach_left >= 1 && has_input_grad {
                self.g_unsent.entry(part.reach_left).or_default().push(part.grad.shallow_clone());
            }
            self.param_parts.push((part.reach_left, part.grad));
        }
        Ok(())
    }

    /// The unsent parts, one sum per reach left (in arrival order: a reach's parts come from
    /// one term), leaving none.
    pub fn take_unsent(&mut self) -> Result<Vec<(usize, Tensor)>, TrainError> {
        let mut out = Vec::new();
        for (reach, parts) in std::mem::take(&mut self.g_unsent) {
            if let Some(sum) = sum_of(&parts)? {
                out.push((reach, sum));
            }
        }
        Ok(out)
    }

    /// Σ of the parts for the parameter pass, added in order of reach left, then of arrival.
    /// Floating-point addition is not associative, and which parts arrive together depends on
    /// the schedule and the placement (a part from a later stage comes in its own message);
    /// a fixed order makes the sum, and so every schedule, bitwise the sequential one. Parts
    /// that share a reach left come from one term in every plan the methods make (the term
    /// that distance back with that reach), and local terms always come first.
    pub fn param_grad(&self) -> Result<Option<Tensor>, TrainError> {
        let mut order: Vec<&(usize, Tensor)> = self.param_parts.iter().collect();
        order.sort_by_key(|(reach, _)| *reach);
        sum_of(order.into_iter().map(|(_, g)| g))
    }
}

/// Σ `parts` in their order, as a new tensor (one part: itself, unchanged); `None` if empty.
fn sum_of<'a>(parts: impl IntoIterator<Item = &'a Tensor>) -> Result<Option<Tensor>, TrainError> {
    let mut it = parts.into_iter();
    let Some(first) = it.next() else { return Ok(None) };
    let Some(second) = it.next() else { return Ok(Some(first.shallow_clone())) };
    let mut sum = first.f_add(second)?;
    for g in it {
        let _ = sum.f_add_(g)?;
    }
    Ok(Some(sum))
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

//! The `sync` and `async` schedules of one stage as state machines: from the events a stage
//! worker has seen they decide what it waits for next and what it does, touching neither
//! threads nor tensors. The worker (`mlaan-engine`'s `pipeline/worker.rs`) receives an event,
//! hands it to [`StageSchedule::on`], and executes the returned actions in order, on the
//! message the event carried. The timelines in `docs/design.md` ("Stages and schedules") are
//! asserted by the tests beside each machine, in milliseconds and without libtorch.
//!
//! This file holds what both machines share (events, waits, actions); each machine has its
//! own file.

mod async_schedule;
mod sync_schedule;

pub use async_schedule::AsyncSchedule;
pub use sync_schedule::SyncSchedule;

/// What a stage worker has just received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A training batch.
    Train(u64),
    /// Evaluation, a drain, or a state collection: handled with no training batch in flight.
    Control,
    /// The previous stage (or the coordinator) closed the input: nothing more will come.
    Closed,
}

/// An event of a stage worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageEvent {
    Input(Input),
    /// A gradient message from the next stage for batch `id`; `last` when it is the last one
    /// for that batch.
    Grad {
        id: u64,
        last: bool,
    },
}

/// What the worker blocks on next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The next input message.
    Input,
    /// The next gradient message from the next stage: a later stage's work on an earlier batch.
    Grad,
    /// A gradient if one is ready, else whichever of a gradient and an input comes first.
    GradOrInput,
}

/// What the worker does, in the order the schedule returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forward, local losses and early sweep of batch `id`; the output goes to the next stage,
    /// what leaves the stage's front to the previous one (F, L and X in design.md).
    Forward(u64),
    /// Sweep the gradient message just received through the stage, graph still held (sync).
    Sweep(u64),
    /// Apply the gradient message just received for a finished batch by recomputation
    /// (async; R in design.md).
    Late(u64),
    /// Parameter pass and optimizer step of batch `id`; `keep_inputs` stores the inputs late
    /// gradients will need (async). P in design.md.
    Step { id: u64, keep_inputs: bool },
    /// Handle the control message received earlier (nothing is in flight now).
    Control,
    /// Leave the loop: the input is closed and nothing is outstanding.
    Exit,
}

/// A gradient message that the schedule cannot place: a protocol violation by a neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfOrder {
    pub got: u64,
    pub expected: Option<u64>,
}

impl std::fmt::Display for OutOfOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gradient for batch {}, expected {:?}", self.got, self.expected)
    }
}

/// A stage's schedule: `sync` (also `sequential`, one stage holding every module) or `async`.
#[derive(Debug, Clone)]
pub enum StageSchedule {
    Sync(SyncSchedule),
    Async(AsyncSchedule),
}

impl StageSchedule {
    /// What to block on next.
    pub fn wait(&self) -> Wait {
        match self {
            StageSchedule::Sync(s) => s.wait(),
            StageSchedule::Async(s) => s.wait(),
        }
    }

    /// The actions for `event`, in order.
    pub fn on(&mut self, event: StageEvent) -> Result<Vec<Action>, OutOfOrder> {
        match self {
            StageSchedule::Sync(s) => s.on(event),
            StageSchedule::Async(s) => Ok(s.on(event)),
        }
    }
}

/// Events, expected actions and a checked replay, shared by the tests of both machines.
#[cfg(test)]
mod test_support {
    use super::*;
    use Action::*;

    pub(super) fn train(id: u64) -> StageEvent {
        StageEvent::Input(Input::Train(id))
    }
    pub(super) fn grad(id: u64) -> StageEvent {
        StageEvent::Grad { id, last: true }
    }
    pub(super) fn part(id: u64) -> StageEvent {
        StageEvent::Grad { id, last: false }
    }
    pub(super) const CONTROL: StageEvent = StageEvent::Input(Input::Control);
    pub(super) const CLOSED: StageEvent = StageEvent::Input(Input::Closed);

    /// Feeds `events`, checking before each that the schedule waits for that kind of event;
    /// returns every action in order.
    pub(super) fn timeline(s: &mut StageSchedule, events: &[StageEvent]) -> Vec<Action> {
        let mut out = Vec::new();
        for &e in events {
            let w = s.wait();
            let allowed = match e {
                StageEvent::Input(_) => matches!(w, Wait::Input | Wait::GradOrInput),
                StageEvent::Grad { .. } => matches!(w, Wait::Grad | Wait::GradOrInput),
            };
            assert!(allowed, "{e:?} arrived while the schedule waits for {w:?}");
            out.extend(s.on(e).unwrap());
        }
        out
    }

    pub(super) fn step(id: u64) -> Action {
        Step { id, keep_inputs: false }
    }
    pub(super) fn step_keep(id: u64) -> Action {
        Step { id, keep_inputs: true }
    }
}

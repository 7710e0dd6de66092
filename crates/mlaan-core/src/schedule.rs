//! The `sync` and `async` schedules of one stage as state machines: from the events a stage
//! worker has seen they decide what it waits for next and what it does, touching neither
//! threads nor tensors. The worker (`mlaan-engine`'s `pipeline/worker.rs`) receives an event,
//! hands it to [`StageSchedule::on`], and executes the returned actions in order, on the
//! message the event carried. The timelines in `docs/design.md` ("Stages and schedules") are asserted by
//! the tests below, in milliseconds and without libtorch.

use crate::micro::MicroBatches;
use std::collections::VecDeque;

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

/// `sync`: keep each batch's graph until the next stage's last message for it, then step.
/// With M micro-batches per step (GPipe) the stage forwards a step's M batches before it
/// waits, and waits for the oldest first.
#[derive(Debug, Clone)]
pub struct SyncSchedule {
    micro: MicroBatches,
    /// Whether the next stage sends gradients for every batch.
    expects_grads: bool,
    /// Forwarded batches whose last gradient message has not arrived, oldest first.
    waiting: VecDeque<u64>,
    /// The last batch of the current step is forwarded: wait for gradients until it steps.
    step_forwarded: bool,
    /// A control message arrived while batches were waiting: handle it once they are done.
    control_pending: bool,
}

impl SyncSchedule {
    pub fn new(micro: MicroBatches, expects_grads: bool) -> Self {
        SyncSchedule {
            micro,
            expects_grads,
            waiting: VecDeque::new(),
            step_forwarded: false,
            control_pending: false,
        }
    }

    pub fn wait(&self) -> Wait {
        if self.control_pending || self.step_forwarded {
            Wait::Grad
        } else {
            Wait::Input
        }
    }

    pub fn on(&mut self, event: StageEvent) -> Result<Vec<Action>, OutOfOrder> {
        let mut actions = Vec::new();
        match event {
            StageEvent::Input(Input::Train(id)) => {
                actions.push(Action::Forward(id));
                self.step_forwarded = self.micro.closes_step(id);
                if self.expects_grads {
                    self.waiting.push_back(id);
                } else {
                    self.step(id, &mut actions);
                }
            }
            StageEvent::Input(Input::Control) if self.waiting.is_empty() => {
                actions.push(Action::Control)
            }
            StageEvent::Input(Input::Control) => self.control_pending = true,
            StageEvent::Input(Input::Closed) => actions.push(Action::Exit),
            StageEvent::Grad { id, last } => {
                if self.waiting.front() != Some(&id) {
                    return Err(OutOfOrder { got: id, expected: self.waiting.front().copied() });
                }
                actions.push(Action::Sweep(id));
                if last {
                    self.waiting.pop_front();
                    self.step(id, &mut actions);
                    if self.control_pending && self.waiting.is_empty() {
                        self.control_pending = false;
                        actions.push(Action::Control);
                    }
                }
            }
        }
        Ok(actions)
    }

    fn step(&mut self, id: u64, actions: &mut Vec<Action>) {
        actions.push(Action::Step { id, keep_inputs: false });
        if self.micro.closes_step(id) {
            self.step_forwarded = false;
        }
    }
}

/// `async`: step at once on what the stage has; late messages for finished batches are applied
/// when they come. At most `in_flight` batches keep stored inputs; at that many the stage takes
/// no input until a last message frees one, which bounds memory and the gradient lag.
#[derive(Debug, Clone)]
pub struct AsyncSchedule {
    in_flight: usize,
    /// Whether the next stage sends gradients back at all.
    expects_grads: bool,
    /// Whether a stepped batch keeps stored inputs until its last late message.
    stores_inputs: bool,
    /// Stepped batches whose inputs are stored, awaiting their last message.
    stored: usize,
    /// A control message or the closed input, to act on once nothing is stored.
    pending: Option<Input>,
}

impl AsyncSchedule {
    pub fn new(in_flight: usize, expects_grads: bool, stores_inputs: bool) -> Self {
        AsyncSchedule {
            in_flight: in_flight.max(1),
            expects_grads,
            stores_inputs,
            stored: 0,
            pending: None,
        }
    }

    /// Batches whose inputs are stored; the worker checks it against the stage's own count.
    pub fn stored(&self) -> usize {
        self.stored
    }

    pub fn wait(&self) -> Wait {
        if self.pending.is_some() || self.stored >= self.in_flight {
            Wait::Grad
        } else if self.expects_grads {
            Wait::GradOrInput
        } else {
            Wait::Input
        }
    }

    pub fn on(&mut self, event: StageEvent) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            StageEvent::Input(Input::Train(id)) => {
                actions.push(Action::Forward(id));
                actions.push(Action::Step { id, keep_inputs: true });
                if self.stores_inputs {
                    self.stored += 1;
                }
            }
            StageEvent::Input(other) if self.stored == 0 => actions.push(Self::act(other)),
            StageEvent::Input(other) => self.pending = Some(other),
            StageEvent::Grad { id, last } => {
                actions.push(Action::Late(id));
                if last && self.stores_inputs {
                    self.stored = self.stored.saturating_sub(1);
                }
                if self.stored == 0 {
                    actions.extend(self.pending.take().map(Self::act));
                }
            }
        }
        actions
    }

    fn act(input: Input) -> Action {
        match input {
            Input::Control => Action::Control,
            _ => Action::Exit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn train(id: u64) -> StageEvent {
        StageEvent::Input(Input::Train(id))
    }
    fn grad(id: u64) -> StageEvent {
        StageEvent::Grad { id, last: true }
    }
    fn part(id: u64) -> StageEvent {
        StageEvent::Grad { id, last: false }
    }
    const CONTROL: StageEvent = StageEvent::Input(Input::Control);
    const CLOSED: StageEvent = StageEvent::Input(Input::Closed);

    /// Feeds `events`, checking before each that the schedule waits for that kind of event;
    /// returns every action in order.
    fn timeline(s: &mut StageSchedule, events: &[StageEvent]) -> Vec<Action> {
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

    fn step(id: u64) -> Action {
        Step { id, keep_inputs: false }
    }
    fn step_keep(id: u64) -> Action {
        Step { id, keep_inputs: true }
    }

    #[test]
    fn sync_stage_waits_for_each_batch_gradient_before_the_next_input() {
        // design.md: stage 0:  F0 L0 ─ wait g0 ─ P0 | F1 L1 ─ wait g1 ─ P1
        let mut s = StageSchedule::Sync(SyncSchedule::new(MicroBatches::new(1), true));
        assert_eq!(s.wait(), Wait::Input);
        assert_eq!(timeline(&mut s, &[train(0)]), [Forward(0)]);
        assert_eq!(s.wait(), Wait::Grad, "a sync stage waits for the later stage, for batch 0");
        assert_eq!(timeline(&mut s, &[part(0)]), [Sweep(0)]);
        assert_eq!(s.wait(), Wait::Grad, "a part that is not the last keeps it waiting");
        assert_eq!(
            timeline(&mut s, &[grad(0), train(1), grad(1)]),
            [Sweep(0), step(0), Forward(1), Sweep(1), step(1)]
        );
        assert_eq!(s.wait(), Wait::Input);
    }

    #[test]
    fn sync_last_stage_never_waits_for_a_gradient() {
        // design.md: stage 1:  F0 L0 X0 ──▶ P0 | F1 L1 X1 ──▶ P1
        let mut s = StageSchedule::Sync(SyncSchedule::new(MicroBatches::new(1), false));
        let t = timeline(&mut s, &[train(0), train(1), CONTROL, train(2), CLOSED]);
        assert_eq!(
            t,
            [Forward(0), step(0), Forward(1), step(1), Control, Forward(2), step(2), Exit]
        );
        assert_eq!(s.wait(), Wait::Input);
    }

    #[test]
    fn gpipe_forwards_the_whole_mini_batch_then_steps_oldest_first() {
        let mut s = StageSchedule::Sync(SyncSchedule::new(MicroBatches::new(3), true));
        let t = timeline(&mut s, &[train(0), train(1), train(2)]);
        assert_eq!(t, [Forward(0), Forward(1), Forward(2)]);
        assert_eq!(s.wait(), Wait::Grad);
        let t = timeline(&mut s, &[grad(0), grad(1), grad(2), train(3)]);
        assert_eq!(t, [Sweep(0), step(0), Sweep(1), step(1), Sweep(2), step(2), Forward(3)]);
        // Every wait points at the oldest unfinished batch: a gradient for another is refused.
        let mut s = SyncSchedule::new(MicroBatches::new(3), true);
        s.on(train(0)).unwrap();
        s.on(train(1)).unwrap();
        assert_eq!(s.on(grad(1)), Err(OutOfOrder { got: 1, expected: Some(0) }));
    }

    #[test]
    fn sync_finishes_waiting_batches_before_a_control_message() {
        let mut s = StageSchedule::Sync(SyncSchedule::new(MicroBatches::new(2), true));
        assert_eq!(timeline(&mut s, &[train(0), CONTROL]), [Forward(0)]);
        assert_eq!(s.wait(), Wait::Grad, "the drain waits for batch 0");
        assert_eq!(timeline(&mut s, &[grad(0)]), [Sweep(0), step(0), Control]);
        assert_eq!(s.wait(), Wait::Input);
    }

    #[test]
    fn async_steps_at_once_and_applies_late_gradients_when_they_come() {
        // design.md: stage 0:  F0 P0 F1 P1 F2 P2 [late g0: R0] F3 P3 [late g1: R1] …
        let mut s = StageSchedule::Async(AsyncSchedule::new(3, true, true));
        let t = timeline(&mut s, &[train(0), train(1), train(2), grad(0), train(3), grad(1)]);
        assert_eq!(
            t,
            [
                Forward(0),
                step_keep(0),
                Forward(1),
                step_keep(1),
                Forward(2),
                step_keep(2),
                Late(0),
                Forward(3),
                step_keep(3),
                Late(1)
            ]
        );
        assert_eq!(s.wait(), Wait::GradOrInput);
    }

    #[test]
    fn async_takes_no_input_while_in_flight_inputs_are_stored() {
        let mut s = StageSchedule::Async(AsyncSchedule::new(2, true, true));
        timeline(&mut s, &[train(0), train(1)]);
        assert_eq!(s.wait(), Wait::Grad, "two stored inputs: wait for the later stage");
        assert_eq!(timeline(&mut s, &[part(0)]), [Late(0)]);
        assert_eq!(s.wait(), Wait::Grad, "a part that is not the last frees nothing");
        assert_eq!(timeline(&mut s, &[grad(0)]), [Late(0)]);
        assert_eq!(s.wait(), Wait::GradOrInput);
    }

    #[test]
    fn async_drains_late_gradients_before_control_and_exit() {
        let mut s = StageSchedule::Async(AsyncSchedule::new(4, true, true));
        assert_eq!(
            timeline(&mut s, &[train(0), train(1), CONTROL]),
            [Forward(0), step_keep(0), Forward(1), step_keep(1)]
        );
        assert_eq!(s.wait(), Wait::Grad);
        assert_eq!(timeline(&mut s, &[grad(0), grad(1)]), [Late(0), Late(1), Control]);
        assert_eq!(timeline(&mut s, &[train(2), CLOSED]), [Forward(2), step_keep(2)]);
        assert_eq!(timeline(&mut s, &[grad(2)]), [Late(2), Exit]);
    }

    #[test]
    fn async_without_gradients_is_a_plain_loop() {
        // DGL and InfoPro: nothing travels backward, every stage only forwards and steps.
        let mut s = StageSchedule::Async(AsyncSchedule::new(2, false, false));
        let t = timeline(&mut s, &[train(0), train(1), train(2), CONTROL, CLOSED]);
        assert_eq!(
            t,
            [
                Forward(0),
                step_keep(0),
                Forward(1),
                step_keep(1),
                Forward(2),
                step_keep(2),
                Control,
                Exit
            ]
        );
        assert_eq!(s.wait(), Wait::Input);
    }

    #[test]
    fn no_wait_of_a_sync_pipeline_can_close_a_cycle() {
        // Simulate D sync stages on one thread, each acting whenever what it waits for is
        // there: every batch finishes, so the waits never form a cycle. A stage waits only for
        // an input (the earlier stage) or a gradient of its oldest batch (the later stage).
        for (d, accumulate) in [(2, 1), (4, 1), (4, 2), (3, 4)] {
            let batches = 12u64;
            let mut stages: Vec<SyncSchedule> = (0..d)
                .map(|s| SyncSchedule::new(MicroBatches::new(accumulate), s + 1 < d))
                .collect();
            let mut inputs: Vec<VecDeque<u64>> = vec![VecDeque::new(); d];
            let mut grads: Vec<VecDeque<u64>> = vec![VecDeque::new(); d];
            inputs[0].extend(0..batches);
            let mut stepped = vec![0u64; d];
            let mut moved = true;
            while moved {
                moved = false;
                for s in 0..d {
                    let event = match stages[s].wait() {
                        Wait::Input => inputs[s].pop_front().map(train),
                        Wait::Grad => grads[s].pop_front().map(grad),
                        Wait::GradOrInput => unreachable!("sync never selects"),
                    };
                    let Some(event) = event else { continue };
                    moved = true;
                    for a in stages[s].on(event).unwrap() {
                        match a {
                            Forward(id) if s + 1 < d => inputs[s + 1].push_back(id),
                            // The stage's own gradient for the previous stage.
                            Forward(id) if s > 0 => grads[s - 1].push_back(id),
                            Sweep(id) if s > 0 => grads[s - 1].push_back(id),
                            Step { .. } => stepped[s] += 1,
                            _ => {}
                        }
                    }
                }
            }
            assert_eq!(stepped, vec![batches; d], "D={d} M={accumulate}: a wait never ended");
        }
    }
}

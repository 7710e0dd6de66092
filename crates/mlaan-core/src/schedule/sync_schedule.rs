//! The `sync` schedule (also `sequential`, one stage holding every module): a stage keeps each
//! batch's graph until the next stage's last gradient message for it, then steps.

use super::{Action, Input, OutOfOrder, StageEvent, Wait};
use crate::micro::MicroBatches;
use std::collections::VecDeque;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::test_support::*;
    use crate::schedule::StageSchedule;
    use Action::*;

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

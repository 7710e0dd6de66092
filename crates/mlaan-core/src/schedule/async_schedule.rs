//! The `async` schedule: a stage steps at once on every batch and applies late gradient
//! messages for finished batches when they come, with a bound on stored inputs.

use super::{Action, Input, StageEvent, Wait};

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
    use crate::schedule::test_support::*;
    use crate::schedule::StageSchedule;
    use Action::*;

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
}

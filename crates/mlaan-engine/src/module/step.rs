//! A module's optimizer step, in its one order: average the accumulated gradients across the
//! data-parallel replicas, let the fp16 loss scale judge them (an overflow skips the update
//! but not the step), apply SGD at the step's learning rate, then publish the real blocks'
//! weights and fold what has arrived into the EMA twins.

use super::clock::Phase;
use super::LocalModule;
use crate::error::TrainError;

impl LocalModule {
    /// Optimizer step with the accumulated gradients (a step whose batches were all dropped
    /// has none and moves nothing), then EMA.
    pub(super) fn step_now(&mut self) -> Result<(), TrainError> {
        if let Some(sync) = &mut self.replicas {
            sync.average(self.grads.accumulated_mut(), &self.opt.params)?;
        }
        let lr = self.lr.at(self.step);
        let finite = match &mut self.scaler {
            Some(scaler) => scaler.check_step(self.grads.accumulated())?,
            None => true,
        };
        if finite {
            self.timed(Phase::Optimizer, |m| m.opt.step(m.grads.accumulated(), lr))?;
        }
        self.grads.clear();
        let step = self.step;
        self.step += 1;
        self.timed(Phase::Ema, |m| m.ema.after_step(step))
    }

    /// Steps skipped for a loss-scale overflow so far (fp16).
    pub fn overflow_skips(&self) -> u64 {
        self.scaler.as_ref().map_or(0, |s| s.skipped)
    }
}

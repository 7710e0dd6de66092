//! When a run stops feeding batches, and what it does then: a periodic checkpoint, an epoch's
//! evaluation and checkpoint, the end. Decided from the step count alone, so that the training
//! loop has one place to ask and the rules are tested without a pipeline.

use mlaan_core::config::RunConfig;

/// The run's boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub steps_per_epoch: u64,
    /// Steps the run trains in all (`train.max_steps`, else every epoch).
    pub total_steps: u64,
    /// `checkpoint.every_steps`; 0 = none between epoch ends.
    pub checkpoint_every: u64,
    pub checkpoint_at_epoch_end: bool,
    pub eval_every_epoch: bool,
}

/// What to do where feeding stopped (the pipeline drained).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Boundary {
    pub evaluate: bool,
    pub checkpoint: bool,
    /// The run's last step: nothing more to feed.
    pub last: bool,
}

impl Cadence {
    pub fn of(cfg: &RunConfig, steps_per_epoch: u64) -> Cadence {
        let all = steps_per_epoch * cfg.train.epochs as u64;
        Cadence {
            steps_per_epoch,
            total_steps: match cfg.train.max_steps {
                0 => all,
                n => (n as u64).min(all),
            },
            checkpoint_every: cfg.checkpoint.every_steps as u64,
            checkpoint_at_epoch_end: cfg.checkpoint.at_epoch_end,
            eval_every_epoch: cfg.train.eval_every_epoch,
        }
    }

    /// The epoch that the batch after `step` batches belongs to.
    pub fn epoch_of(&self, step: u64) -> usize {
        (step / self.steps_per_epoch) as usize
    }

    /// The first boundary after `step`: the next periodic checkpoint, epoch end, or the end.
    pub fn next_stop(&self, step: u64) -> u64 {
        let epoch_end = (step / self.steps_per_epoch + 1) * self.steps_per_epoch;
        let periodic = match self.checkpoint_every {
            0 => u64::MAX,
            n => (step / n + 1) * n,
        };
        epoch_end.min(periodic).min(self.total_steps)
    }

    /// What to do at `step`, a boundary [`Cadence::next_stop`] gave.
    pub fn at(&self, step: u64) -> Boundary {
        let last = step >= self.total_steps;
        let epoch_end = step.is_multiple_of(self.steps_per_epoch) || last;
        let periodic = self.checkpoint_every > 0 && step.is_multiple_of(self.checkpoint_every);
        Boundary {
            evaluate: last || (epoch_end && self.eval_every_epoch),
            checkpoint: last || periodic || (epoch_end && self.checkpoint_at_epoch_end),
            last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cadence(every: u64, at_epoch_end: bool, eval_every_epoch: bool, total: u64) -> Cadence {
        Cadence {
            steps_per_epoch: 10,
            total_steps: total,
            checkpoint_every: every,
            checkpoint_at_epoch_end: at_epoch_end,
            eval_every_epoch,
        }
    }

    /// Every boundary from step 0, with what happens there.
    fn boundaries(c: &Cadence) -> Vec<(u64, Boundary)> {
        let mut out = Vec::new();
        let mut step = 0;
        while step < c.total_steps {
            step = c.next_stop(step);
            out.push((step, c.at(step)));
        }
        out
    }

    fn b(evaluate: bool, checkpoint: bool, last: bool) -> Boundary {
        Boundary { evaluate, checkpoint, last }
    }

    #[test]
    fn epoch_ends_checkpoint_and_the_end_evaluates() {
        let c = cadence(0, true, false, 30);
        let want =
            [(10, b(false, true, false)), (20, b(false, true, false)), (30, b(true, true, true))];
        assert_eq!(boundaries(&c), want);
        let c = cadence(0, false, true, 30);
        let want =
            [(10, b(true, false, false)), (20, b(true, false, false)), (30, b(true, true, true))];
        assert_eq!(boundaries(&c), want);
    }

    #[test]
    fn periodic_checkpoints_fall_between_and_on_epoch_ends() {
        let c = cadence(4, false, false, 20);
        let steps: Vec<u64> = boundaries(&c).iter().map(|x| x.0).collect();
        assert_eq!(steps, [4, 8, 10, 12, 16, 20]);
        assert!(!c.at(10).checkpoint, "an epoch end is not a periodic step here");
        assert!(c.at(8).checkpoint && c.at(12).checkpoint && !c.at(8).evaluate);
        // A periodic step on an epoch end is one checkpoint, not two.
        let c = cadence(5, true, false, 20);
        assert_eq!(boundaries(&c).iter().filter(|x| x.1.checkpoint).count(), 4);
    }

    #[test]
    fn max_steps_ends_mid_epoch_with_evaluation_and_checkpoint() {
        let c = cadence(0, false, false, 13);
        assert_eq!(boundaries(&c), [(10, b(false, false, false)), (13, b(true, true, true))]);
        // Resumed from a periodic checkpoint in the middle of epoch 1.
        assert_eq!(c.next_stop(12), 13);
        assert_eq!((c.epoch_of(12), c.epoch_of(10), c.epoch_of(9)), (1, 1, 0));
    }
}

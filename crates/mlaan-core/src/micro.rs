//! Micro-batches: the one owner of how a mini-batch (one optimizer step) is split and
//! numbered. With `pipeline.micro_batches = M` the coordinator sends step s as the M batches
//! `s·M .. s·M + M − 1` (GPipe, and the single-process reference of M data-parallel replicas);
//! a sync stage forwards a step's batches before it waits for their gradients, and a module
//! steps its optimizer after the last of them. All three ask this type; none counts for
//! itself.

/// How many batches make one optimizer step, and their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatches {
    per_step: u64,
}

impl MicroBatches {
    /// `per_step` batches per step (at least one).
    pub fn new(per_step: usize) -> Self {
        MicroBatches { per_step: per_step.max(1) as u64 }
    }

    pub fn per_step(&self) -> usize {
        self.per_step as usize
    }

    /// The batch ids of optimizer step `step`, in order.
    pub fn ids(&self, step: u64) -> std::ops::Range<u64> {
        step * self.per_step..(step + 1) * self.per_step
    }

    /// The optimizer step batch `id` belongs to.
    pub fn step_of(&self, id: u64) -> u64 {
        id / self.per_step
    }

    /// Whether batch `id` is the last of its step: after it, the step is taken.
    pub fn closes_step(&self, id: u64) -> bool {
        id % self.per_step == self.per_step - 1
    }
}

impl Default for MicroBatches {
    fn default() -> Self {
        MicroBatches::new(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_numbered_in_runs_of_m() {
        let m = MicroBatches::new(4);
        assert_eq!(m.ids(0), 0..4);
        assert_eq!(m.ids(3), 12..16);
        let closing: Vec<u64> = (0..12).filter(|&i| m.closes_step(i)).collect();
        assert_eq!(closing, [3, 7, 11]);
        assert!((12..16).all(|i| m.step_of(i) == 3));
        let one = MicroBatches::new(0);
        assert_eq!((one.per_step(), one.ids(5)), (1, 5..6));
        assert!((0..5).all(|i| one.closes_step(i) && one.step_of(i) == i));
    }
}

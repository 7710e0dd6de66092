//! Where a module's time goes: wall time per phase of its work, accumulated over the run; a
//! stage's metrics window reports the differences. On CUDA these are host times (kernels run
//! asynchronously), so a phase then says where the host waited, not where the device worked.

use std::collections::BTreeMap;
use std::time::Duration;

/// A phase of a module's work on a batch or a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The module's forward (and the rebuilds of recompute mode and late gradients).
    Forward,
    /// Every loss term: heads, decoders and LAM chains, forward and backward.
    Terms,
    /// The backward passes that send gradients to the previous module (and, when every
    /// gradient travels on, give the parameters theirs in the same pass).
    BackwardInput,
    /// The backward pass that gives the module's own parameters their gradients.
    BackwardParams,
    /// The optimizer step.
    Optimizer,
    /// Publishing EMA snapshots and folding them into twins.
    Ema,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Forward,
        Phase::Terms,
        Phase::BackwardInput,
        Phase::BackwardParams,
        Phase::Optimizer,
        Phase::Ema,
    ];

    /// The phase's key in metrics and reports.
    pub fn name(self) -> &'static str {
        mlaan_core::metrics::PHASES[self as usize]
    }
}

/// Time spent per phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes([Duration; 6]);

impl PhaseTimes {
    pub fn add(&mut self, phase: Phase, d: Duration) {
        self.0[phase as usize] += d;
    }

    pub fn get(&self, phase: Phase) -> Duration {
        self.0[phase as usize]
    }

    /// Both together.
    pub fn plus(mut self, other: &PhaseTimes) -> PhaseTimes {
        for p in Phase::ALL {
            self.add(p, other.get(p));
        }
        self
    }

    /// What was spent after `earlier` (a reading of the same clock).
    pub fn since(&self, earlier: &PhaseTimes) -> PhaseTimes {
        let mut d = PhaseTimes::default();
        for p in Phase::ALL {
            d.add(p, self.get(p).saturating_sub(earlier.get(p)));
        }
        d
    }

    /// Milliseconds by phase name.
    pub fn to_ms(&self) -> BTreeMap<String, f64> {
        Phase::ALL
            .iter()
            .map(|&p| (p.name().to_string(), self.get(p).as_secs_f64() * 1e3))
            .collect()
    }
}

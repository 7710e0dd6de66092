//! Batches dropped for a non-finite loss (`pipeline.on_nonfinite = "skip"`): how many in all,
//! and the run's stop when `pipeline.max_consecutive_skips` come in a row, which means the
//! model has diverged rather than met one bad batch.

use anyhow::Result;
use mlaan_engine::TrainError;
use std::collections::BTreeSet;

/// Ids further below the newest skipped one than this are forgotten; stages report drops out
/// of order only within the batches in flight, far fewer.
const HORIZON: u64 = 4096;

pub struct SkipGuard {
    limit: usize,
    total: u64,
    recent: BTreeSet<u64>,
}

impl SkipGuard {
    /// `limit`: consecutive skipped batches that stop the run (0: never stop).
    pub fn new(limit: usize) -> Self {
        SkipGuard { limit, total: 0, recent: BTreeSet::new() }
    }

    /// Batches skipped so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// A stage dropped `batch` because of `cause`. An error (still matchable as `cause`)
    /// when this makes `limit` batches in a row.
    pub fn note(&mut self, stage: usize, batch: u64, cause: TrainError) -> Result<()> {
        tracing::warn!("stage {stage} skipped batch {batch}: {cause}");
        self.total += 1;
        self.recent.insert(batch);
        let newest = *self.recent.last().expect("just inserted");
        self.recent = self.recent.split_off(&newest.saturating_sub(HORIZON));
        if self.limit == 0 {
            return Ok(());
        }
        let row = self.run_through(batch, self.limit);
        if row >= self.limit {
            return Err(anyhow::Error::new(cause).context(format!(
                "{row} batches in a row had a non-finite loss (pipeline.max_consecutive_skips = \
                 {}): the model has diverged; the last one",
                self.limit
            )));
        }
        Ok(())
    }

    /// Length of the run of consecutive skipped ids that contains `batch`, counted up to
    /// `cap` either way.
    fn run_through(&self, batch: u64, cap: usize) -> usize {
        let down = (0..=batch).rev().take(cap).take_while(|b| self.recent.contains(b)).count();
        let up = (batch + 1..).take(cap).take_while(|b| self.recent.contains(b)).count();
        down + up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nan(batch: u64) -> TrainError {
        TrainError::NonFinite { module: 1, batch, what: "Dgl loss = NaN".into() }
    }

    #[test]
    fn stops_at_the_limit_in_a_row_in_any_arrival_order() {
        let mut g = SkipGuard::new(3);
        g.note(0, 10, nan(10)).unwrap();
        g.note(0, 12, nan(12)).unwrap();
        g.note(1, 20, nan(20)).unwrap();
        assert_eq!(g.total(), 3);
        // 11 joins 10 and 12 into three in a row.
        let e = g.note(2, 11, nan(11)).unwrap_err();
        assert!(format!("{e:#}").contains("3 batches in a row"), "{e:#}");
        let root = e.downcast_ref::<TrainError>().expect("the cause stays matchable");
        assert!(matches!(root, TrainError::NonFinite { batch: 11, .. }));
    }

    #[test]
    fn zero_never_stops_and_old_ids_are_forgotten() {
        let mut g = SkipGuard::new(0);
        for b in 0..10_000 {
            g.note(0, b, nan(b)).unwrap();
        }
        assert_eq!(g.total(), 10_000);
        assert!(g.recent.len() as u64 <= HORIZON + 1);
    }
}

//! Per-term statistics of a module: each loss term's summed loss and accuracy since the last
//! metrics window, which the window reports as means and then starts again.

/// Per-term loss and accuracy sums since the last report.
#[derive(Debug, Default, Clone)]
pub struct TermStats {
    pub loss_sum: f64,
    pub correct: i64,
    pub seen: i64,
    pub batches: u64,
}

impl TermStats {
    /// Mean loss per batch (NaN when no batch was seen).
    pub fn mean_loss(&self) -> f64 {
        if self.batches > 0 {
            self.loss_sum / self.batches as f64
        } else {
            f64::NAN
        }
    }
}

/// Every term's mean loss since the last call; the sums start again.
pub fn take_means(stats: &mut [TermStats]) -> Vec<f64> {
    let means = stats.iter().map(TermStats::mean_loss).collect();
    stats.iter_mut().for_each(|s| *s = TermStats::default());
    means
}

//! A stage's memory, counted in one place: what its modules hold (each module's
//! `live_bytes`), plus the batches queued on its input channel, with the peak probed after
//! every call on a module. The sender of a batch adds its bytes to the receiving stage's
//! [`Queued`] as it sends; the stage takes them off as it takes the batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes queued on a stage's input channel (shared by the sending and the receiving thread).
#[derive(Debug, Clone, Default)]
pub struct Queued(Arc<AtomicU64>);

impl Queued {
    /// A batch of `bytes` was sent to the stage.
    pub fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The stage took a batch of `bytes` off its channel.
    pub fn remove(&self, bytes: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Peaks of a stage's live bytes: since the last probe was folded in, in the current metrics
/// window, and over the run.
#[derive(Debug, Default)]
pub struct StageMemory {
    pub queued: Queued,
    probe: u64,
    window: u64,
    run: u64,
}

impl StageMemory {
    /// After a call on a module: `held` is what the stage's modules hold now plus what the
    /// call held and freed, so the peak counts graphs that live only inside one call.
    pub fn probe(&mut self, held: u64) {
        self.probe = self.probe.max(held);
    }

    /// Fold the probes since the last call (at least `now`, the modules' bytes now) and the
    /// queue into the window's and the run's peaks.
    pub fn note(&mut self, now: u64) {
        let peak = std::mem::take(&mut self.probe).max(now) + self.queued.get();
        self.window = self.window.max(peak);
        self.run = self.run.max(peak);
    }

    /// The window's peak; the next window starts from nothing.
    pub fn take_window_peak(&mut self) -> u64 {
        std::mem::take(&mut self.window)
    }

    pub fn run_peak(&self) -> u64 {
        self.run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_count_probes_and_the_queue() {
        let mut m = StageMemory::default();
        let sender = m.queued.clone();
        sender.add(100);
        m.probe(1_000);
        m.note(500);
        assert_eq!(m.take_window_peak(), 1_100);
        m.queued.remove(100);
        m.queued.remove(100);
        assert_eq!(m.queued.get(), 0, "never below zero");
        m.note(700);
        assert_eq!((m.take_window_peak(), m.run_peak()), (700, 1_100));
    }
}

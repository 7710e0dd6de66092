//! A stage's metrics window: compute time, images and peak memory since the last report,
//! joined with the port's waits into the [`StageWindow`] the coordinator logs.

use super::port::Waits;
use crate::module::clock::PhaseTimes;
use crate::module::Traffic;
use crate::stage::Stage;
use mlaan_core::metrics::StageWindow;
use std::time::{Duration, Instant};

pub struct Window {
    start: Instant,
    pub busy: Duration,
    pub batches: u64,
    pub images: u64,
    /// Batches between the newest forward and the batch of the last late gradient (async).
    pub last_lag: u64,
    /// The stage's replica traffic and phase times when the window opened.
    traffic_at_start: Traffic,
    phases_at_start: PhaseTimes,
    overflow_skips_at_start: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            start: Instant::now(),
            busy: Duration::ZERO,
            batches: 0,
            images: 0,
            last_lag: 0,
            traffic_at_start: Traffic::default(),
            phases_at_start: PhaseTimes::default(),
            overflow_skips_at_start: 0,
        }
    }
}

/// Everything of the stage a window reports besides the window's own counts.
pub struct StageView<'a> {
    pub index: usize,
    pub stage: &'a mut Stage,
    pub waits: Waits,
    pub queue_depth: usize,
}

impl Window {
    /// Close the window into a report and start the next one.
    pub fn close(&mut self, v: StageView) -> StageWindow {
        let now = Instant::now();
        let wall = now - self.start;
        let c = std::mem::take(self);
        let traffic = v.stage.replica_traffic();
        let reduced = traffic - c.traffic_at_start;
        self.traffic_at_start = traffic;
        let phases = v.stage.phase_times();
        let spent = phases.since(&c.phases_at_start);
        self.phases_at_start = phases;
        let overflow_skips = v.stage.overflow_skips();
        self.overflow_skips_at_start = overflow_skips;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        StageWindow {
            stage: v.index,
            device: format!("{:?}", v.stage.device),
            modules: v.stage.modules.iter().map(|m| m.index).collect(),
            batches: c.batches,
            images: c.images,
            images_per_s: c.images as f64 / wall.as_secs_f64().max(1e-9),
            busy_ms: ms(c.busy),
            wait_input_ms: ms(v.waits.input),
            wait_output_ms: ms(v.waits.output),
            wait_grad_ms: ms(v.waits.grad),
            wall_ms: ms(wall),
            allreduce_ms: ms(reduced.time),
            allreduce_bytes: reduced.bytes,
            phases_ms: spent.to_ms(),
            queue_depth: v.queue_depth,
            grad_lag: c.last_lag,
            live_bytes: v.stage.live_bytes(),
            peak_live_bytes: v.stage.memory.take_window_peak(),
            overflow_skips: overflow_skips - c.overflow_skips_at_start,
            loss: Vec::new(),
        }
    }
}

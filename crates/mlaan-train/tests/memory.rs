//! Memory per stage is bounded: live tensor bytes do not grow with run length.

mod common;

use common::tiny;
use mlaan_core::config::Schedule;
use mlaan_train::pipeline::Event;
use mlaan_train::trainer::{RunOptions, Session};
use std::collections::BTreeMap;

#[test]
fn live_bytes_stay_flat_over_a_long_run() {
    for schedule in [Schedule::Async, Schedule::Sync] {
        let mut cfg = tiny("mlaan-dgl", 4);
        cfg.pipeline.schedule = schedule;
        cfg.pipeline.devices = vec!["cpu".into(); 4];
        cfg.train.log_every = 50;
        cfg.train.epochs = 20;
        let mut s = Session::start(&cfg, &RunOptions::default()).unwrap();
        // (stage, step) → live bytes at the end of that window.
        let mut live: BTreeMap<(usize, u64), u64> = BTreeMap::new();
        let mut note = |events: Vec<Event>| {
            for e in events {
                if let Event::Window { stage, step, window, .. } = e {
                    live.insert((stage, step), window.live_bytes);
                }
            }
            Ok(false)
        };
        let mut epoch = 0;
        while s.next_id < 500 {
            s.feed_epoch(epoch, 500, &mut note).unwrap();
            epoch += 1;
        }
        let _ = note(s.drain().unwrap()).unwrap();
        s.finish().unwrap();
        for stage in 0..4 {
            let at50 = live[&(stage, 50)];
            let at500 = live[&(stage, 500)];
            assert!(at50 > 0);
            // Identical state at both points, up to the batches in flight at that moment.
            let slack = at50 / 10;
            assert!(
                at500 <= at50 + slack,
                "{schedule}: stage {stage} held {at50} bytes at step 50 and {at500} at step 500"
            );
            eprintln!(
                "{schedule} stage {stage}: live bytes {at50} at step 50, {at500} at step 500"
            );
        }
    }
}

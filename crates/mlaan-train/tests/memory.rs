//! Memory per stage is bounded: live tensor bytes do not grow with run length.

mod common;

use common::{feed_steps, mlaan_on_four_stages};
use mlaan_core::config::Schedule;
use mlaan_engine::wire::Event;
use mlaan_train::session::{RunOptions, Session};
use std::collections::BTreeMap;

#[test]
fn live_bytes_stay_flat_over_a_long_run() {
    for schedule in [Schedule::Async, Schedule::Sync] {
        let mut cfg = mlaan_on_four_stages(schedule);
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
        feed_steps(&mut s, 500, &mut note);
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

/// Peak live bytes of every stage after `steps` batches.
fn stage_peaks(cfg: &mlaan_core::config::RunConfig, steps: u64) -> Vec<u64> {
    let mut s = Session::start(cfg, &RunOptions::default()).unwrap();
    feed_steps(&mut s, steps, &mut |_| Ok(false));
    s.drain().unwrap();
    s.finish().unwrap().iter().map(|(_, peak)| *peak).collect()
}

#[test]
fn recomputation_lowers_the_peak_of_stages_with_lam_chains() {
    for schedule in [Schedule::Sync, Schedule::Async] {
        let mut cfg = mlaan_on_four_stages(schedule);
        cfg.train.batch_size = 32;
        let keep = stage_peaks(&cfg, 12);
        cfg.pipeline.recompute = true;
        let rebuild = stage_peaks(&cfg, 12);
        eprintln!("{schedule}: peak bytes per stage {keep:?}, with recomputation {rebuild:?}");
        for (stage, (k, r)) in keep.iter().zip(&rebuild).enumerate() {
            assert!(*r > 0, "{schedule}: stage {stage} reported no bytes");
            // Module 0 has no local loss and the last one only a small head: their peak is
            // their own graph either way (up to a gradient on h held at another moment).
            assert!(*r <= k + k / 20, "{schedule}: stage {stage} peak {r} > {k} without");
        }
        // The middle modules carry LAM chains whose graphs no longer sit on top of theirs.
        for stage in [1, 2] {
            let (k, r) = (keep[stage], rebuild[stage]);
            assert!(r < k, "{schedule}: stage {stage} peak {r}, {k} without recomputation");
        }
    }
}

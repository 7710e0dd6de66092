//! A failing stage brings the whole pipeline down within seconds, naming the stage, batch and
//! cause; every thread is joined; nothing hangs. One test in its own binary, so that the stage
//! threads it counts are its own.

mod common;

use common::tiny;
use mlaan_core::config::Schedule;
use mlaan_train::pipeline::{Fault, FaultKind};
use mlaan_train::trainer::{RunOptions, Session};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Threads of this process whose name starts with `stage-`.
fn stage_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("stage-"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn run_with_fault(schedule: Schedule, fault: Fault) -> Result<(), String> {
    let mut cfg = tiny("mlaan-dgl", 4);
    cfg.pipeline.schedule = schedule;
    cfg.pipeline.devices = vec!["cpu".into(); 4];
    let opts = RunOptions { fault: Some(fault), ..Default::default() };
    let mut s = Session::start(&cfg, &opts).map_err(|e| format!("{e:#}"))?;
    let r = (|| {
        for epoch in 0..3 {
            s.feed_epoch(epoch, 60, &mut |_| Ok(false))?;
        }
        s.drain()?;
        Ok::<_, anyhow::Error>(())
    })();
    let fin = s.finish();
    r.and(fin.map(|_| ())).map_err(|e| format!("{e:#}"))
}

#[test]
fn any_failing_stage_stops_the_pipeline_cleanly() {
    let kinds = [FaultKind::Error, FaultKind::Panic, FaultKind::NaN, FaultKind::CloseChannel];
    for schedule in [Schedule::Async, Schedule::Sync] {
        for stage in 0..4 {
            for kind in kinds {
                let fault = Fault { stage, batch: 5, kind };
                let (tx, rx) = mpsc::channel();
                let t0 = Instant::now();
                std::thread::spawn(move || {
                    let _ = tx.send(run_with_fault(schedule, fault));
                });
                let result = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
                    panic!("{schedule} {kind:?} at stage {stage}: the pipeline hung")
                });
                let took = t0.elapsed();
                let err =
                    result.expect_err(&format!("{schedule} {kind:?} at stage {stage}: no error"));
                match kind {
                    FaultKind::Error | FaultKind::Panic => {
                        assert!(err.contains(&format!("stage {stage}")), "{err}");
                        assert!(err.contains("batch Some(5)") || err.contains("batch 5"), "{err}");
                        assert!(
                            err.contains(if kind == FaultKind::Panic {
                                "panicked"
                            } else {
                                "injected error"
                            }),
                            "{err}"
                        );
                    }
                    // The first stage with a loss of its own sees the NaN (stage 0 holds only
                    // module 0, which has none under MLAAN).
                    FaultKind::NaN => {
                        assert!(err.contains("non-finite") && err.contains("batch 5"), "{err}")
                    }
                    FaultKind::CloseChannel => assert!(err.contains("stopped"), "{err}"),
                }
                assert!(
                    took < Duration::from_secs(30),
                    "{schedule} {kind:?} at stage {stage}: took {took:?}"
                );
                assert_eq!(
                    stage_threads(),
                    0,
                    "{schedule} {kind:?} at stage {stage}: stage threads left running"
                );
            }
        }
    }
}

//! A failing stage brings the whole pipeline down within seconds, naming the stage, batch and
//! cause; every thread is joined; nothing hangs. Each schedule × fault × stage is a test of
//! its own, so that one failure cannot hide the others; they take turns (in a binary of their
//! own), so that the stage threads each counts are its own.

mod common;

use common::tiny;
use mlaan_core::config::Schedule;
use mlaan_core::device::DeviceSpec;
use mlaan_engine::pipeline::{Fault, FaultKind};
use mlaan_engine::TrainError;
use mlaan_train::session::{RunOptions, Session};
use std::sync::{mpsc, Mutex, PoisonError};
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
    cfg.pipeline.devices = vec![DeviceSpec::Cpu; 4];
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

/// Drills run one at a time, so that the stage threads a drill counts are its own.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `kind` injected at batch 5 of `stage`: the run fails within seconds with an error naming
/// the stage, batch and cause, and leaves no stage thread behind.
fn drill(schedule: Schedule, stage: usize, kind: FaultKind) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let before = stage_threads();
    let fault = Fault { stage, batch: 5, kind };
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(run_with_fault(schedule, fault));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{schedule} {kind:?} at stage {stage}: the pipeline hung"));
    let took = t0.elapsed();
    let err = result.expect_err(&format!("{schedule} {kind:?} at stage {stage}: no error"));
    match kind {
        FaultKind::Error | FaultKind::Panic => {
            assert!(err.contains(&format!("stage {stage}")), "{err}");
            assert!(err.contains("batch Some(5)") || err.contains("batch 5"), "{err}");
            let cause = if kind == FaultKind::Panic { "panicked" } else { "injected error" };
            assert!(err.contains(cause), "{err}");
        }
        // The first stage with a loss of its own sees the NaN (stage 0 holds only module 0,
        // which has none under MLAAN).
        FaultKind::NaN => assert!(err.contains("non-finite") && err.contains("batch 5"), "{err}"),
        FaultKind::CloseChannel => assert!(err.contains("stopped"), "{err}"),
    }
    assert!(took < Duration::from_secs(30), "{schedule} {kind:?} at stage {stage}: took {took:?}");
    // Threads a failed drill before this one may have left are not this drill's.
    assert!(
        stage_threads() <= before,
        "{schedule} {kind:?} at stage {stage}: stage threads left running"
    );
}

/// One test per stage, for one schedule and fault kind.
macro_rules! every_stage {
    ($schedule:ident, $kind:ident) => {
        #[test]
        fn stage_0() {
            crate::drill(Schedule::$schedule, 0, FaultKind::$kind);
        }
        #[test]
        fn stage_1() {
            crate::drill(Schedule::$schedule, 1, FaultKind::$kind);
        }
        #[test]
        fn stage_2() {
            crate::drill(Schedule::$schedule, 2, FaultKind::$kind);
        }
        #[test]
        fn stage_3() {
            crate::drill(Schedule::$schedule, 3, FaultKind::$kind);
        }
    };
}

/// Every fault kind at every stage of one schedule: `<schedule>_schedule::<kind>::stage_N`.
macro_rules! every_fault {
    ($schedule:ident) => {
        mod error {
            use super::*;
            every_stage!($schedule, Error);
        }
        mod panic {
            use super::*;
            every_stage!($schedule, Panic);
        }
        mod nan {
            use super::*;
            every_stage!($schedule, NaN);
        }
        mod close_channel {
            use super::*;
            every_stage!($schedule, CloseChannel);
        }
    };
}

mod sync_schedule {
    use super::*;
    every_fault!(Sync);
}

mod async_schedule {
    use super::*;
    every_fault!(Async);
}

#[test]
fn a_non_finite_loss_stays_matchable_through_the_stage_failure() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let mut cfg = tiny("mlaan-dgl", 4);
    cfg.pipeline.schedule = Schedule::Sync;
    cfg.pipeline.devices = vec![DeviceSpec::Cpu; 4];
    let fault = Fault { stage: 1, batch: 5, kind: FaultKind::NaN };
    let opts = RunOptions { fault: Some(fault), ..Default::default() };
    let mut s = Session::start(&cfg, &opts).unwrap();
    let err = (|| {
        for epoch in 0..3 {
            s.feed_epoch(epoch, 60, &mut |_| Ok(false))?;
        }
        s.drain()?;
        Ok::<_, anyhow::Error>(())
    })()
    .expect_err("a NaN at stage 1 stops the run");
    let _ = s.finish();
    let e = err.downcast_ref::<TrainError>().unwrap_or_else(|| panic!("not a TrainError: {err:#}"));
    assert!(matches!(e, TrainError::Stage { stage: 1, .. }), "{e}");
    // Stage 1 holds module 1 alone, whose independent loss sees the NaN first.
    assert!(matches!(e.root(), TrainError::NonFinite { module: 1, batch: 5, .. }), "{e:?}");
}

//! `pipeline.on_nonfinite = "skip"`: a batch whose loss is not finite is dropped from the
//! module that saw it on, consistently on every later stage, under every schedule; each
//! module's step count stays aligned; the run counts the skips, and stops when too many come
//! in a row.

mod common;

use common::{max_rel_diff, tiny};
use mlaan_core::config::{OnNonFinite, RunConfig, Schedule};
use mlaan_core::device::DeviceSpec;
use mlaan_core::metrics::MetricRecord;
use mlaan_engine::pipeline::{Fault, FaultKind};
use mlaan_engine::wire::{Event, ModuleSnapshot};
use mlaan_engine::TrainError;
use mlaan_train::session::{RunOptions, Session};
use mlaan_train::trainer::{self, Outcome};

/// `method` with K = 4 on `stages` CPU stages, dropping non-finite batches, at a constant
/// learning rate (so that a skipped step moves no schedule).
fn skipping(method: &str, schedule: Schedule, stages: usize) -> RunConfig {
    let mut c = tiny(method, 4);
    c.pipeline.schedule = schedule;
    c.pipeline.devices = vec![DeviceSpec::Cpu; stages];
    c.pipeline.on_nonfinite = OnNonFinite::Skip;
    c.optim.warmup_epochs = 0.0;
    c.optim.min_lr = c.optim.lr;
    c
}

/// Feed the first `n` batches of epoch 0 except those in `leave_out`; the skip events seen;
/// every module after a drain.
fn feed(
    cfg: &RunConfig,
    fault: Option<Fault>,
    n: usize,
    leave_out: &[usize],
) -> (Vec<(usize, u64)>, Vec<ModuleSnapshot>) {
    let mut s = Session::start(cfg, &RunOptions { fault, ..Default::default() }).unwrap();
    let batches: Vec<_> = s.train_loader().epoch(0).take(n).map(|b| b.unwrap()).collect();
    let mut skipped = Vec::new();
    let mut note = |events: Vec<Event>| {
        for e in events {
            if let Event::Skipped { stage, batch, cause } = e {
                assert!(matches!(cause, TrainError::NonFinite { .. }), "{cause}");
                skipped.push((stage, batch));
            }
        }
    };
    for (i, b) in batches.iter().enumerate() {
        if !leave_out.contains(&i) {
            let (x, t) = s.tensors(b);
            s.send_batch(x, t).unwrap();
            note(s.take_events().unwrap());
        }
    }
    note(s.drain().unwrap());
    let snaps = s.snapshots().unwrap();
    s.finish().unwrap();
    (skipped, snaps)
}

fn all_finite(snaps: &[ModuleSnapshot]) -> bool {
    snaps
        .iter()
        .flat_map(|m| &m.state)
        .all(|(_, t)| !t.is_floating_point() || t.isfinite().all().int64_value(&[]) == 1)
}

#[test]
fn a_batch_dropped_at_the_first_stage_is_as_if_it_never_came() {
    // A NaN input poisons every module's loss: all four stages drop batch 5, and their
    // parameters, running statistics and momentum end as if batch 5 had not been fed.
    let nan = Fault { stage: 0, batch: 5, kind: FaultKind::NaN };
    let (skipped, dropped) = feed(&skipping("dgl", Schedule::Sync, 4), Some(nan), 10, &[]);
    assert_eq!(skipped, vec![(0, 5)], "one stage reports the skip, once");
    let (none, reference) = feed(&skipping("dgl", Schedule::Sequential, 1), None, 10, &[5]);
    assert!(none.is_empty());
    assert!(all_finite(&dropped), "a dropped batch leaves no NaN behind");
    for (a, b) in dropped.iter().zip(&reference) {
        assert_eq!(a.step, 10, "module {}: the dropped batch still counts as a step", a.module);
        assert_eq!(b.step, 9);
        for ((name, x), (_, y)) in
            a.state.iter().zip(&b.state).chain(a.momentum.iter().zip(&b.momentum))
        {
            let d = max_rel_diff(x, y);
            assert!(d < 1e-5, "module {} `{name}` differs by {d:e}", a.module);
        }
    }
}

#[test]
fn a_batch_dropped_mid_pipeline_keeps_every_schedule_aligned() {
    // MLAAN sends cascade gradients backward: stage 2 drops batch 3 and still answers for it,
    // so the stages before it finish batch 3 on their own losses and nobody waits.
    for schedule in [Schedule::Sync, Schedule::Async] {
        let nan = Fault { stage: 2, batch: 3, kind: FaultKind::NaN };
        let (skipped, snaps) = feed(&skipping("mlaan-dgl", schedule, 4), Some(nan), 12, &[]);
        assert_eq!(skipped, vec![(2, 3)], "{schedule}");
        assert!(
            snaps.iter().all(|m| m.step == 12),
            "{schedule}: steps {:?}",
            snaps.iter().map(|m| m.step).collect::<Vec<_>>()
        );
        assert!(all_finite(&snaps), "{schedule}");
    }
}

#[test]
fn a_run_counts_its_skips_and_stops_when_they_come_in_a_row() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = skipping("mlaan-dgl", Schedule::Async, 2);
    cfg.train.epochs = 1;
    cfg.train.log_every = 4;
    let nan = Fault { stage: 1, batch: 6, kind: FaultKind::NaN };
    let opts = RunOptions { fault: Some(nan), ..Default::default() };
    let Outcome::Finished(summary) = trainer::train(&cfg, out.path(), &opts).unwrap() else {
        panic!("not finished")
    };
    assert_eq!(summary.skipped_batches, 1);
    let text = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let last_train = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<MetricRecord>(l).ok())
        .filter_map(|r| match r {
            MetricRecord::Train { skipped_batches, .. } => Some(skipped_batches),
            _ => None,
        })
        .next();
    assert_eq!(last_train, Some(1), "metrics.jsonl counts the skip");

    // A learning rate that blows the weights up: every later batch is non-finite, and the
    // run stops at the limit instead of skipping forever.
    let mut diverging = cfg.clone();
    diverging.optim.lr = 1e12;
    diverging.optim.min_lr = 1e12;
    diverging.pipeline.max_consecutive_skips = 4;
    let err =
        trainer::train(&diverging, out.path().join("diverging").as_path(), &RunOptions::default())
            .expect_err("diverged");
    let msg = format!("{err:#}");
    assert!(msg.contains("4 batches in a row") && msg.contains("max_consecutive_skips"), "{msg}");
    assert!(
        matches!(err.downcast_ref::<TrainError>(), Some(TrainError::NonFinite { .. })),
        "{msg}"
    );
}

//! The training loop, top to bottom: open the data, plan the network, place the modules,
//! start the pipeline, feed it epoch by epoch, evaluate, save, summarise.

use crate::cadence::{Boundary, Cadence};
use crate::checkpoint::resume;
use crate::evaluate::EvalResult;
use crate::metrics::{progress_bar, MetricsLog};
use crate::session::{RunOptions, Session};
use crate::summary::{finish, RunTotals, Summary};
use anyhow::{Context, Result};
use mlaan_core::config::RunConfig;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    Finished(Box<Summary>),
    /// Stopped by a signal after writing `checkpoint` at `step`.
    Interrupted {
        checkpoint: PathBuf,
        step: u64,
    },
}

/// Train `cfg`, writing the run directory `out`.
pub fn train(cfg: &RunConfig, out: &Path, opts: &RunOptions) -> Result<Outcome> {
    let wall = Instant::now();
    let world = opts.world();
    // Rank 0 writes the run's files; the other replicas only read checkpoints to resume.
    let leader = world.is_leader();
    if leader {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create run directory {}", out.display()))?;
        std::fs::write(out.join("config.toml"), cfg.to_toml())?;
    }
    let ckpt_root = out.join("ckpt");
    let from = match &opts.resume {
        Some(spec) => resume::find(spec, &ckpt_root)?,
        None => None,
    };
    let resumed = from.as_ref().map(|c| c.meta.step);
    let mut s = Session::start_from(cfg, opts, from)?;
    let mut log = MetricsLog::new(out, cfg, s.plan(), s.num_stages(), resumed, leader)?;
    let cadence = Cadence::of(cfg, s.steps_per_epoch());
    let signalled = || opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
    // A signal on any rank stops every rank at one agreed step (see `World::stop_step`).
    let margin = 2 * (s.num_stages() as u64 + 1) * (cfg.pipeline.in_flight as u64 + 1);
    let mut stop_at: Option<u64> = None;
    let mut stop_due = |next: u64| -> Result<bool> {
        if stop_at.is_none() {
            stop_at = world.stop_step(signalled(), next, margin)?;
        }
        Ok(stop_at.is_some_and(|step| next >= step))
    };
    let bar = progress_bar(cadence.total_steps, "train");
    bar.set_position(s.next_id());
    let mut train_time = Duration::ZERO;
    let mut eval = EvalResult::default();
    while s.next_id() < cadence.total_steps {
        // Feed up to the next boundary, drain there, then do what the boundary asks.
        let epoch = cadence.epoch_of(s.next_id());
        let t = Instant::now();
        if !stop_due(s.next_id())? {
            let mut next = s.next_id();
            s.feed_epoch(epoch, cadence.next_stop(s.next_id()), &mut |events| {
                bar.inc(1);
                log.absorb(events, epoch, &bar)?;
                next += 1;
                stop_due(next)
            })?;
        }
        log.absorb(s.drain()?, epoch, &bar)?;
        train_time += t.elapsed();
        let stopping = stop_due(s.next_id())?;
        let at = match stopping {
            true => Boundary { checkpoint: true, ..Boundary::default() },
            false => cadence.at(s.next_id()),
        };
        if at.evaluate {
            eval = s.evaluate()?;
            log.eval(s.next_id(), epoch, &eval)?;
            tracing::info!("epoch {epoch}: test accuracy {:.4}", eval.accuracy());
        }
        if at.checkpoint {
            let checkpoint = s.checkpoint(&ckpt_root, opts.checkpoint_pause)?;
            if stopping {
                let step = s.next_id();
                bar.abandon_with_message(format!("interrupted at step {step}"));
                log.plot();
                s.finish()?;
                world.finish()?;
                return Ok(Outcome::Interrupted { checkpoint, step });
            }
        }
    }
    bar.finish_and_clear();
    if resumed.is_some() && eval.modules.is_empty() {
        // Resumed at the very end: evaluate what was loaded.
        eval = s.evaluate()?;
    }
    let totals = RunTotals {
        resumed_at: resumed.unwrap_or(0),
        train_time,
        started: wall,
        skipped_batches: log.skips.total(),
    };
    let summary = finish(s, cfg, out, opts.save_model, &eval, log.last_windows(), totals)?;
    Ok(Outcome::Finished(Box::new(summary)))
}

/// A new run directory for `cfg`: `runs/<method>-<arch>-YYYYMMDD-HHMMSS` (see [`run_dir`]).
///
/// [`run_dir`]: crate::run_dir
pub fn new_run_dir(cfg: &RunConfig) -> Result<PathBuf> {
    let name = format!("{}-{}", cfg.method.name, cfg.model.arch);
    crate::run_dir::create_run_dir(Path::new("runs"), &name)
        .with_context(|| format!("cannot create a run directory under runs/ for {name}"))
}

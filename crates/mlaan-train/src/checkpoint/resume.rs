//! Resuming: which checkpoint `--resume` names, that every rank resumes from the same step,
//! and that the checkpoint can continue this run (what [`CheckpointMeta::of`] wrote is checked
//! field by field against the run).
//!
//! [`CheckpointMeta::of`]: super::CheckpointMeta::of

use super::{latest, read, Checkpoint};
use crate::distributed::World;
use anyhow::{bail, Context, Result};
use mlaan_core::config::RunConfig;
use mlaan_core::plan::NetworkPlan;
use std::path::Path;

/// Find what `--resume` names: `auto` is the newest complete checkpoint under `ckpt_root`
/// (none is fine: a fresh start), anything else a checkpoint directory that must load.
pub fn find(spec: &str, ckpt_root: &Path) -> Result<Option<Checkpoint>> {
    if spec == "auto" {
        return Ok(latest(ckpt_root)?);
    }
    let dir = Path::new(spec);
    Ok(Some(read(dir).with_context(|| format!("--resume {spec}"))?))
}

/// Every rank resumes from the same step (or none does): they must see the same run
/// directory. The error lists what each rank found.
pub fn agree(world: &World, from: Option<&Checkpoint>) -> Result<()> {
    let steps = world.gather("resume step", &from.map(|c| c.meta.step))?;
    if steps.iter().any(|s| *s != steps[0]) {
        bail!(
            "the ranks would resume from different steps ({}): every rank must see the same \
             run directory (a shared filesystem) and its checkpoints",
            steps
                .iter()
                .enumerate()
                .map(|(r, s)| match s {
                    Some(s) => format!("rank {r}: step {s}"),
                    None => format!("rank {r}: no checkpoint"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Whether `c` can continue as this run: the same network and the same data order. Another number of replicas can, at the same global
/// batch: a step then covers the same images, every rank takes rank 0's weights, and only
/// BatchNorm's running statistics (per replica) restart from rank 0's.
pub fn check_compatible(
    c: &Checkpoint,
    cfg: &RunConfig,
    plan: &NetworkPlan,
    spe: u64,
    world: usize,
) -> Result<()> {
    let m = &c.meta;
    let global = cfg.train.batch_size * world;
    if m.global_batch != 0 && m.global_batch != global {
        bail!(
            "checkpoint {} was trained with a global batch of {} ({} rank(s)) but this run's is \
             {global} ({world} rank(s) × {}): a step there is not a step here. Resume with \
             ranks × batch size = {}",
            c.dir.display(),
            m.global_batch,
            m.world_size,
            cfg.train.batch_size,
            m.global_batch
        );
    }
    let mismatch = |what: &str, had: String, now: String| {
        anyhow::anyhow!(
            "checkpoint {} has {what} {had} but the config asks for {now}",
            c.dir.display()
        )
    };
    if m.method != cfg.method.name.to_string() {
        return Err(mismatch("method", m.method.clone(), cfg.method.name.to_string()));
    }
    if m.arch != cfg.model.arch {
        return Err(mismatch("arch", m.arch.clone(), cfg.model.arch.clone()));
    }
    if m.k != plan.k() {
        return Err(mismatch("K", m.k.to_string(), plan.k().to_string()));
    }
    if m.steps_per_epoch != spe {
        return Err(mismatch("steps per epoch", m.steps_per_epoch.to_string(), spe.to_string()));
    }
    if m.seed != cfg.train.seed {
        return Err(mismatch("seed", m.seed.to_string(), cfg.train.seed.to_string()));
    }
    Ok(())
}

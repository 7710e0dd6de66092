use crate::cli::TrainArgs;
use anyhow::{Context, Result};
use mlaan_train::trainer::{default_run_dir, train, RunOptions};

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = args.config.resolve()?;
    let out = args.out.unwrap_or_else(|| default_run_dir(&cfg));
    let fault = args
        .inject_fault
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let opts = RunOptions {
        fault,
        save_model: true,
    };
    tracing::info!(
        "training {} {} K={} ({} schedule) on {:?}, run directory {}",
        cfg.method.name,
        cfg.model.arch,
        cfg.model.k,
        cfg.pipeline.schedule,
        cfg.pipeline.devices,
        out.display()
    );
    let s = train(&cfg, &out, &opts).with_context(|| format!("run {}", out.display()))?;
    println!(
        "{} {} K={} on {}: test accuracy {:.4} ({} epochs, {} steps), {:.1} images/s, {:.1} s; results in {}",
        s.method,
        s.arch,
        s.k,
        s.dataset,
        s.test_accuracy,
        s.epochs,
        s.steps,
        s.train_images_per_s,
        s.wall_s,
        out.display()
    );
    Ok(())
}

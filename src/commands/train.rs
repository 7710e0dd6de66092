use crate::cli::TrainArgs;
use anyhow::{Context, Result};
use mlaan_core::config::Method;
use mlaan_core::device::DeviceSpec;
use mlaan_train::distributed::World;
use mlaan_train::session::RunOptions;
use mlaan_train::trainer::{new_run_dir, train, Outcome};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Exit code of a run stopped by SIGINT/SIGTERM/SIGUSR1 after writing its checkpoint
/// (EX_TEMPFAIL: "try again", what a requeued SLURM job expects).
pub const EXIT_INTERRUPTED: i32 = 75;

pub fn run(args: TrainArgs) -> Result<()> {
    let mut cfg = args.config.resolve()?;
    let fault =
        args.inject_fault.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?;
    // Signals first: a SIGTERM during the rendezvous must not kill the process outright.
    let interrupt = install_signal_handlers()?;
    let world = Arc::new(World::from_env(&cfg.distributed)?);
    cfg.distributed.world_size = world.size();
    world.agree_on_config(&cfg)?;
    // A GPU that is not here stops the run before it has a directory.
    mlaan_train::devices::resolve(&world.local_devices(&cfg.pipeline.devices)?)?;
    // Rank 0 names the run directory; every replica uses that one.
    let out = match args.out {
        Some(dir) => dir,
        None => world.rank0_decides("run directory", || new_run_dir(&cfg))?,
    };
    let opts = RunOptions {
        fault,
        save_model: true,
        resume: args.resume.clone(),
        interrupt: Some(interrupt),
        checkpoint_pause: args.checkpoint_pause_ms.map(std::time::Duration::from_millis),
        world: Some(world.clone()),
    };
    // One e2e module is plain back-propagation on one stage: no schedule applies.
    let how = if cfg.method.name == Method::E2e && cfg.model.k == 1 {
        "end-to-end back-propagation, one stage".to_string()
    } else {
        format!("{} schedule", cfg.pipeline.schedule)
    };
    tracing::info!(
        "training {} {} K={} ({how}) on {}, {} from {}, run directory {}",
        cfg.method.name,
        cfg.model.arch,
        cfg.model.k,
        DeviceSpec::names(&cfg.pipeline.devices).join(","),
        cfg.data.dataset,
        args.config.source(),
        out.display()
    );
    match train(&cfg, &out, &opts).with_context(|| format!("run {}", out.display()))? {
        Outcome::Finished(s) if !world.is_leader() => {
            tracing::info!("rank {} finished at step {}", world.rank(), s.steps);
            Ok(())
        }
        Outcome::Finished(s) => {
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
        Outcome::Interrupted { checkpoint, step } => {
            eprintln!(
                "interrupted at step {step}; checkpoint {} written; continue with --resume auto --out {}",
                checkpoint.display(),
                out.display()
            );
            std::process::exit(EXIT_INTERRUPTED);
        }
    }
}

/// SIGINT, SIGTERM and SIGUSR1 (SLURM's warning before pre-emption) ask the run to drain,
/// checkpoint and stop; a second SIGINT exits at once.
fn install_signal_handlers() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flag.clone())?;
    for sig in [SIGINT, SIGTERM, SIGUSR1] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

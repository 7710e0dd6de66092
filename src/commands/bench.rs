use crate::cli::BenchArgs;
use anyhow::{Context, Result};
use mlaan_train::bench::{run as run_bench, BenchSpec};
use mlaan_train::distributed::World;
use std::path::Path;
use std::sync::Arc;

pub fn run(mut args: BenchArgs) -> Result<()> {
    if args.config.dataset.is_none() && args.config.config.is_none() {
        // Synthetic CIFAR-shaped data: the benchmark needs no files.
        args.config.dataset = Some("synthetic".into());
        args.config.set.splice(
            0..0,
            ["data.synthetic_size=32", "data.synthetic_channels=3", "data.synthetic_classes=10"]
                .map(String::from),
        );
    }
    if args.config.method.is_none() {
        // The cases choose their methods; the base only has to be a valid K-module config.
        args.config.method = Some("dgl".into());
    }
    if args.config.k.is_none() && args.config.config.is_none() {
        // The standard benchmark's split (docs/benchmarks.md): ResNet-32 in 4 modules.
        args.config.k = Some(4);
    }
    let base = args.config.resolve()?;
    // Under a launcher (a replicated case's processes, or the user's torchrun) every case
    // runs with that many replicas; rank 0 reports.
    let world = Arc::new(World::from_env(&base.distributed)?);
    world.agree_on_config(&base)?;
    let spec = BenchSpec {
        base,
        cases: args.cases.clone(),
        warmup: args.warmup,
        steps: args.steps,
        repeats: args.repeats,
        micro_batches: args.micro_batches,
        world: (world.size() > 1).then(|| world.clone()),
        launcher: std::env::current_exe().ok(),
    };
    let report = run_bench(&spec, &mut |line| {
        if world.is_leader() {
            eprintln!("{line}")
        }
    })?;
    if !world.is_leader() {
        return world.finish();
    }
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => mlaan_train::run_dir::create_run_dir(Path::new("runs"), "bench")
            .context("creating a bench directory under runs/")?,
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    mlaan_report::write_atomic(
        &out.join("bench.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let md = mlaan_report::bench_markdown(&report);
    mlaan_report::write_atomic(&out.join("bench.md"), md.as_bytes())?;
    let plots = mlaan_report::bench_plots(&report, &out)?;
    if args.markdown {
        println!("{md}");
    } else {
        println!("{md}");
        println!(
            "plots: {}",
            plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    eprintln!("results in {}", out.display());
    world.finish()
}

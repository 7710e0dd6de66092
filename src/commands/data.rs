//! `mlaan-pipe data ...`: check, download, benchmark and generate datasets.

use crate::cli::{ConfigArgs, DataCommand, FetchArgs, LoaderBenchArgs, MakeImageFolderArgs};
use anyhow::{bail, Context, Result};
use mlaan_data::registry::DEBIAN_FASHION_MNIST;
use std::path::{Path, PathBuf};

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Verify(a) => verify(a),
        DataCommand::Fetch(a) => fetch(a),
        DataCommand::Bench(a) => bench(a),
        DataCommand::MakeImagefolder(a) => make_imagefolder(a),
    }
}

/// The folder a dataset is read from under `cfg`, for messages.
fn data_dir(cfg: &mlaan_core::config::DataConfig) -> PathBuf {
    cfg.dir.clone().unwrap_or_else(|| mlaan_data::default_dir(&cfg.dataset))
}

fn verify(args: ConfigArgs) -> Result<()> {
    let cfg = args.resolve()?;
    let dir = data_dir(&cfg.data);
    let report = mlaan_data::verify(&cfg.data)
        .with_context(|| format!("verifying {} in {}", cfg.data.dataset, dir.display()))?;
    print!("{report}");
    if !report.is_ok() {
        bail!("dataset {} in {} has problems (listed above)", report.dataset, dir.display());
    }
    Ok(())
}

/// Where `data fetch NAME` writes without `--to`: the dataset's default folder, except where
/// that is Debian's read-only Fashion-MNIST package folder.
fn fetch_dir(name: &str) -> PathBuf {
    let dir = mlaan_data::default_dir(name);
    if dir != Path::new(DEBIAN_FASHION_MNIST) {
        return dir;
    }
    let dir = match std::env::var_os("MLAAN_DATA_DIR") {
        Some(root) if !root.is_empty() => PathBuf::from(root).join(name),
        _ => PathBuf::from("data").join(name),
    };
    eprintln!(
        "note: {name} is already installed by Debian's dataset-fashion-mnist package in \
         {DEBIAN_FASHION_MNIST} (read-only), which training uses by default; fetching into {} \
         (pass --to to choose)",
        dir.display()
    );
    dir
}

fn fetch(args: FetchArgs) -> Result<()> {
    let to = args.to.clone().unwrap_or_else(|| fetch_dir(&args.name));
    let opts = mlaan_data::FetchOptions {
        base_url: args.base_url.clone(),
        svhn_extra: args.svhn_extra,
        force: args.force,
        ..Default::default()
    };
    let report = mlaan_data::fetch(&args.name, &to, &opts)
        .with_context(|| format!("fetching {} into {}", args.name, to.display()))?;
    print!("{report}");
    Ok(())
}

fn bench(args: LoaderBenchArgs) -> Result<()> {
    let cfg = args.config.resolve()?;
    let dir = data_dir(&cfg.data);
    let data = mlaan_data::open(&cfg.data)
        .with_context(|| format!("opening {} in {}", cfg.data.dataset, dir.display()))?;
    let (split, transform, name) = if args.eval {
        (data.test.clone(), data.eval_transform.clone(), "test")
    } else {
        (data.train.clone(), data.train_transform.clone(), "train")
    };
    let workers = match args.workers.unwrap_or(cfg.data.workers) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let batch = args.batch.unwrap_or(cfg.train.batch_size);
    if batch == 0 || args.batches == 0 {
        bail!("--batch and --batches must be at least 1 (got {batch} and {})", args.batches);
    }
    println!("{}", split.describe());
    println!("{name} transform: {transform}");
    let report = mlaan_data::measure_throughput(split, transform, workers, batch, args.batches);
    println!("{report}");
    if report.batches == 0 {
        bail!(
            "no batch could be loaded{}",
            report.first_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    Ok(())
}

fn make_imagefolder(args: MakeImageFolderArgs) -> Result<()> {
    mlaan_data::write_synthetic_imagefolder(
        &args.dir,
        args.classes,
        args.per_class,
        args.width,
        args.height,
        args.seed,
    )
    .with_context(|| format!("writing an image folder into {}", args.dir.display()))?;
    println!(
        "wrote {} classes x {} training images (+{} val per class) of {}x{} to {}; \
         use --dataset imagefolder --data-dir {}",
        args.classes,
        args.per_class,
        args.per_class.div_ceil(10),
        args.width,
        args.height,
        args.dir.display(),
        args.dir.display()
    );
    Ok(())
}

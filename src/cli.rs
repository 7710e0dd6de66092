//! Command-line interface. The config file says what to train; flags say where and how, and
//! override the file (flags > `--set` > file > defaults).

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use mlaan_core::config::RunConfig;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "mlaan-pipe",
    version,
    about = "Pipeline-parallel supervised local learning (MLAAN, DGL, InfoPro) of ResNets"
)]
pub struct Cli {
    /// Only warnings and errors on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a network; writes config.toml, metrics.jsonl, summary.json and model.safetensors.
    Train(TrainArgs),
    /// Print the split, LAM chains, placement, parameters and activation sizes; no training.
    Plan(ConfigArgs),
    /// Evaluate a saved backbone (model.safetensors) on the test set.
    Eval(EvalArgs),
}

/// Flags that build the run config.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set optim.lr=0.05` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Dataset: fashion-mnist, mnist, cifar10, cifar100, svhn, stl10, imagenet, imagefolder, synthetic.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Directory holding the dataset's files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Backbone, e.g. resnet20, resnet32, resnet110, resnet34.
    #[arg(long)]
    pub arch: Option<String>,
    /// e2e, dgl, infopro, mlaan-dgl, mlaan-infopro.
    #[arg(long)]
    pub method: Option<String>,
    /// Number of local modules.
    #[arg(long)]
    pub k: Option<usize>,
    /// sequential, sync or async.
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many steps (the schedule still spans the configured epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Batches in flight per stage.
    #[arg(long)]
    pub in_flight: Option<usize>,
    /// Devices, e.g. `cpu` or `cpu,cpu` (one stage per device).
    #[arg(long, conflicts_with = "gpus")]
    pub devices: Option<String>,
    /// GPU indices, e.g. `0,1,2,3` (as CUDA_VISIBLE_DEVICES numbers them).
    #[arg(long)]
    pub gpus: Option<String>,
}

impl ConfigArgs {
    /// Defaults, then the file, then `--set`, then the dedicated flags.
    pub fn resolve(&self) -> Result<RunConfig> {
        let mut o = self.set.clone();
        let mut put = |k: &str, v: String| o.push(format!("{k}={v}"));
        let q = |s: &str| format!("{s:?}");
        if let Some(v) = &self.dataset {
            put("data.dataset", q(v));
        }
        if let Some(v) = &self.data_dir {
            put("data.dir", q(&v.display().to_string()));
        }
        if let Some(v) = &self.arch {
            put("model.arch", q(v));
        }
        if let Some(v) = &self.method {
            put("method.name", q(v));
        }
        if let Some(v) = self.k {
            put("model.k", v.to_string());
        }
        if let Some(v) = &self.schedule {
            put("pipeline.schedule", q(v));
        }
        if let Some(v) = self.epochs {
            put("train.epochs", v.to_string());
        }
        if let Some(v) = self.batch_size {
            put("train.batch_size", v.to_string());
        }
        if let Some(v) = self.lr {
            put("optim.lr", v.to_string());
        }
        if let Some(v) = self.seed {
            put("train.seed", v.to_string());
        }
        if let Some(v) = self.max_steps {
            put("train.max_steps", v.to_string());
        }
        if let Some(v) = self.in_flight {
            put("pipeline.in_flight", v.to_string());
        }
        let list = |items: Vec<String>| {
            format!(
                "[{}]",
                items.iter().map(|s| q(s)).collect::<Vec<_>>().join(",")
            )
        };
        if let Some(v) = &self.devices {
            put(
                "pipeline.devices",
                list(v.split(',').map(|s| s.trim().to_string()).collect()),
            );
        }
        if let Some(v) = &self.gpus {
            let gpus = mlaan_core::device::DeviceSpec::gpus(v)?;
            put(
                "pipeline.devices",
                list(gpus.iter().map(|d| d.to_string()).collect()),
            );
        }
        Ok(RunConfig::load(self.config.as_deref(), &o)?)
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Run directory (default: runs/<method>-<arch>-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Inject a fault for drills: KIND@STAGE:BATCH, KIND = error|panic|nan|close.
    #[arg(long, hide = true)]
    pub inject_fault: Option<String>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Backbone weights written by `train` (model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
}

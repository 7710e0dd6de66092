//! Command-line interface. The config file says what to train; flags say where and how, and
//! override the file (flags > `--set` > file > defaults).

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use mlaan_core::config::{ConfigSource, DataConfig, RunConfig};
use mlaan_core::recipe;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "mlaan-pipe",
    version,
    about = "Pipeline-parallel supervised local learning (MLAAN, DGL, InfoPro) of ResNets",
    override_usage = "mlaan-pipe [TRAIN FLAGS]          (the same as `mlaan-pipe train [TRAIN FLAGS]`)\n       \
                      mlaan-pipe <COMMAND> [FLAGS]",
    after_help = "Without a command, mlaan-pipe trains: `mlaan-pipe --gpus 0,1,2,3 --dataset imagenet` \
                  is `mlaan-pipe train --gpus 0,1,2,3 --dataset imagenet`. Without --config, \
                  --dataset picks that dataset's recipe (the published setting, from configs/; \
                  Fashion-MNIST when no dataset is named); flags and --set go on top. \
                  `mlaan-pipe train --help` lists the training flags.",
    subcommand_negates_reqs = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Only warnings and errors on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `mlaan-pipe [TRAIN FLAGS]`: the flags of `train`.
    #[command(flatten)]
    pub train: TrainArgs,
}

impl Cli {
    /// Parse the process's arguments (see [`Cli::try_parse_checked`]); exits with clap's
    /// message on an error or `--help`.
    pub fn parse_checked() -> Cli {
        Cli::try_parse_checked(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parse as clap does, refusing training flags before another command (`mlaan-pipe --k 2
    /// plan`): they belong to the bare command or to `train`. (clap's own
    /// `args_conflicts_with_subcommands` would also refuse the global `--quiet` there.)
    pub fn try_parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let mut cmd = Cli::command();
        let m = cmd.try_get_matches_from_mut(args)?;
        if let Some((name, _)) = m.subcommand() {
            // Flags of the bare command given on the command line (not the argument groups
            // clap makes of flattened structs, nor the global --quiet).
            let flags: Vec<String> = cmd
                .get_arguments()
                .filter(|a| a.get_id() != "quiet")
                .filter(|a| m.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
                .map(|a| format!("--{}", a.get_long().unwrap_or(a.get_id().as_str())))
                .collect();
            if !flags.is_empty() {
                return Err(cmd.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "{} given before `{name}`: training flags go to `mlaan-pipe [TRAIN \
                         FLAGS]` or after `train`; `{name}` takes its own after its name",
                        flags.join(", ")
                    ),
                ));
            }
        }
        Cli::from_arg_matches(&m)
    }

    /// The command to run: the one named, else `train` with the flags given.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Train(self.train))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a network (the default command); writes config.toml, metrics.jsonl,
    /// summary.json and model.safetensors.
    Train(TrainArgs),
    /// Print the split, LAM chains, placement, parameters and activation sizes; no training.
    Plan(PlanArgs),
    /// Evaluate a saved backbone (model.safetensors) on the test set.
    Eval(EvalArgs),
    /// Write the trained backbone alone as a torchvision-style state dict (safetensors).
    Export(ExportArgs),
    /// Datasets: verify, fetch, benchmark the loader, generate an image folder.
    #[command(subcommand)]
    Data(DataCommand),
    /// Throughput and memory of e2e, GPipe and the local methods on the same devices, side by
    /// side in one run; writes bench.json, bench.md and plots.
    Bench(BenchArgs),
    /// Plot a run (metrics.jsonl → curves.png) or a benchmark (bench.json → PNGs) in place.
    Plot(PlotArgs),
    /// Compare finished runs (their summary.json): accuracy per method and seed, as Markdown.
    Compare(CompareArgs),
    /// Start data-parallel replicas of a command on this machine, as torchrun would: N
    /// processes with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set. Local rank r
    /// trains on the r-th slice of --gpus. One failing process stops the others.
    Launch(LaunchArgs),
    /// What this machine offers mlaan-pipe, and why a GPU is not used when it is not: libtorch
    /// and its CUDA backend, the driver and GPUs (NVML and libtorch), NCCL, Gloo, cores, data.
    Doctor(DoctorArgs),
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The dataset whose folder to look for (default: the default dataset's).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Its folder (default: the dataset's default folder).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Machine-readable output: JSON on stdout, or into FILE when one is given.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(after_help = "Example: mlaan-pipe launch --nproc-per-node 2 -- train --gpus 0,1,2,3 \
                  --method mlaan-dgl --k 2\n(two replicas, each a 2-stage pipeline: rank 0 on \
                  GPUs 0,1, rank 1 on GPUs 2,3)")]
pub struct LaunchArgs {
    /// Processes (replicas) on this node.
    #[arg(long, default_value_t = 2)]
    pub nproc_per_node: usize,
    /// Nodes in all (each runs `mlaan-pipe launch` with its own --node-rank).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index among --nnodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Where rank 0 serves the rendezvous store.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// The store's port (default: MASTER_PORT, else a free one; required with --nnodes > 1).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// After one process fails, how long the others get to fail by themselves (and say
    /// why) before they are killed.
    #[arg(long, default_value_t = 10.0)]
    pub grace_s: f64,
    /// The mlaan-pipe command each process runs, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run or benchmark directories.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Run directories (each with a summary.json).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Also write the table to this Markdown file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    #[arg(long, default_value = "Method comparison")]
    pub title: String,
    /// The command that reproduces the runs, quoted in the table's header.
    #[arg(long, default_value = "mlaan-pipe compare")]
    pub command: String,
    /// Write the table as the section NAME of the Markdown file (a `##` heading between
    /// `<!-- NAME -->` and `<!-- /NAME -->`), replacing that section and keeping the rest of
    /// the file, so that tables made from different runs can share one page.
    #[arg(long, value_name = "NAME", requires = "markdown")]
    pub section: Option<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model, data, batch, K and devices (dataset defaults to CIFAR-shaped synthetic data).
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Cases, `METHOD[:SCHEDULE][+MODIFIER...]`; `e2e` runs on the first device, `gpipe` is
    /// pipelined backprop with micro-batches, local methods default to `async`. Modifiers:
    /// `+recompute` rebuilds module graphs for the backward passes to save memory; `+fp32`,
    /// `+bf16`, `+fp16` set train.precision, `+channels-last`/`+contiguous` train.memory_format,
    /// `+default-stream`/`+stream-per-stage` pipeline.streams. A case is compared with the e2e
    /// (gpipe) case of the same precision and layout when there is one.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "e2e,gpipe,dgl,infopro,mlaan-dgl,mlaan-dgl:sync,mlaan-dgl:sync+recompute,mlaan-infopro"
    )]
    pub cases: Vec<String>,
    /// Untimed batches before each measurement.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed batches per measurement.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Repetitions of every case, interleaved.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Micro-batches of the GPipe case.
    #[arg(long, default_value_t = 4)]
    pub micro_batches: usize,
    /// Output directory (default: runs/bench-YYYYMMDD-HHMMSS).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the Markdown summary (for pasting into an issue) instead of the table.
    #[arg(long)]
    pub markdown: bool,
}

/// Flags that build the run config.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file; replaces the dataset's recipe.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set optim.lr=0.05` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Dataset: fashion-mnist, mnist, cifar10, cifar100, svhn, stl10, imagenet, imagefolder,
    /// synthetic. Without --config it also picks the dataset's recipe (configs/ has them all).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Directory holding the dataset's files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Backbone: resnet20, resnet32, resnet110, resnet34, ...; vit-tiny, vit-small-p4,
    /// vit-w128-d8-h4-p7, ...; vgg13, vgg13-cifar, vgg11-cifar-w16, ...
    #[arg(long)]
    pub arch: Option<String>,
    /// e2e, dgl, infopro, auglocal, mlaan-dgl, mlaan-infopro, mlaan-auglocal.
    #[arg(long)]
    pub method: Option<String>,
    /// Number of local modules. The split and the LAM chains then follow this K
    /// (`model.split = "auto"`, `method.lam.source = "auto"`) unless --set gives them.
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
    /// GPU indices, e.g. `0,1,2,3` (as CUDA_VISIBLE_DEVICES numbers them): the node's GPUs.
    /// With L processes per node (launch, torchrun, srun), local rank r takes the r-th of L
    /// equal slices: `0,1,2,3` with 2 processes gives rank 0 GPUs 0,1 and rank 1 GPUs 2,3.
    #[arg(long)]
    pub gpus: Option<String>,
}

impl ConfigArgs {
    /// What the config starts from: `--config`, else the recipe of `--dataset` (or of the
    /// default dataset) for `--method`, else the built-in defaults (a dataset without a recipe).
    pub fn source(&self) -> ConfigSource<'_> {
        if let Some(path) = &self.config {
            return ConfigSource::File(path);
        }
        let dataset = self.dataset.clone().unwrap_or_else(|| DataConfig::default().dataset);
        recipe::for_dataset(&dataset, self.method.as_deref())
            .map_or(ConfigSource::Defaults, ConfigSource::Recipe)
    }

    /// The source (see [`ConfigArgs::source`]), then `--set`, then the dedicated flags.
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
            // A file's or recipe's split and chains were written for its own K.
            let given = |key: &str| self.set.iter().any(|s| s.trim_start().starts_with(key));
            if !given("model.split") {
                put("model.split", q("auto"));
            }
            if !given("method.lam.source") {
                put("method.lam.source", q("auto"));
            }
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
            format!("[{}]", items.iter().map(|s| q(s)).collect::<Vec<_>>().join(","))
        };
        if let Some(v) = &self.devices {
            put("pipeline.devices", list(v.split(',').map(|s| s.trim().to_string()).collect()));
        }
        if let Some(v) = &self.gpus {
            let gpus = mlaan_core::device::DeviceSpec::gpus(v)?;
            put("pipeline.devices", list(gpus.iter().map(|d| d.to_string()).collect()));
        }
        Ok(RunConfig::load_from(self.source(), &o)?)
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Run directory (default: runs/<method>-<arch>-YYYYMMDD-HHMMSS, in local time).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Inject a fault for drills: KIND@STAGE:BATCH, KIND = error|panic|nan|close.
    #[arg(long, hide = true)]
    pub inject_fault: Option<String>,
    /// Continue from a checkpoint: `auto` (the newest complete one under OUT/ckpt, or a fresh
    /// start when there is none) or a checkpoint directory.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
    /// Drills: pause this long before a checkpoint's completion marker is written.
    #[arg(long, hide = true)]
    pub checkpoint_pause_ms: Option<u64>,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Data-parallel processes per node (default: LOCAL_WORLD_SIZE, else 1): shows each local
    /// rank's slice of the devices, and places one replica on its slice.
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Machine-readable output: JSON on stdout, or into FILE when one is given.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Backbone weights written by `train` (model.safetensors), or a run directory holding
    /// `model.safetensors` and `config.toml`.
    #[arg(long)]
    pub model: PathBuf,
    /// Also write the result as JSON: on stdout, or into FILE when one is given.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run directory (its model.safetensors, else its newest complete checkpoint), a
    /// checkpoint directory (`ckpt/step-NNNNNNNN`), or a model.safetensors file.
    pub source: PathBuf,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Read every sample of both splits once; exits non-zero when anything is wrong.
    Verify(ConfigArgs),
    /// Download a public dataset and check its published checksums.
    Fetch(FetchArgs),
    /// Measure the loader's throughput (decode + augmentation) on a dataset.
    Bench(LoaderBenchArgs),
    /// Write a synthetic JPEG image folder (`DIR/train/class_NNN/*.jpg`, `DIR/val/...`).
    MakeImagefolder(MakeImageFolderArgs),
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Dataset: fashion-mnist, mnist, cifar10, cifar100, svhn, stl10.
    pub name: String,
    /// Target folder (default: the dataset's default folder, `./data/<name>` or
    /// `$MLAAN_DATA_DIR/<name>`).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// SVHN: also fetch `extra_32x32.mat` (1.3 GB).
    #[arg(long)]
    pub svhn_extra: bool,
    /// Download again even when the files are present with the right checksum.
    #[arg(long)]
    pub force: bool,
    /// Fetch from this mirror instead of the canonical host (`<URL>/<file name>`).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct LoaderBenchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Decoder threads (default: `data.workers`; 0 = all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Images per batch (default: `train.batch_size`).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Batches to time.
    #[arg(long, default_value_t = 50)]
    pub batches: usize,
    /// Time the test split with the evaluation transform instead of the training one.
    #[arg(long)]
    pub eval: bool,
}

#[derive(Args, Debug)]
pub struct MakeImageFolderArgs {
    /// Folder to create.
    pub dir: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Training images per class (the val split gets a tenth, at least one).
    #[arg(long, default_value_t = 100)]
    pub per_class: usize,
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    #[arg(long, default_value_t = 64)]
    pub height: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_do_not_clash() {
        Cli::command().debug_assert();
    }

    #[test]
    fn without_a_command_the_flags_are_trains() {
        let parse = |a: &[&str]| {
            Cli::try_parse_checked(std::iter::once("mlaan-pipe").chain(a.iter().copied()))
        };
        let cli = parse(&["--gpus", "0,1", "--dataset", "imagenet"]).unwrap();
        let Command::Train(t) = cli.into_command() else { panic!("not train") };
        assert_eq!(t.config.gpus.as_deref(), Some("0,1"));
        assert_eq!(t.config.dataset.as_deref(), Some("imagenet"));
        for args in [&["-q", "train", "--k", "2"][..], &["train", "-q", "--k", "2"]] {
            let cli = parse(args).unwrap();
            assert!(cli.quiet);
            let Command::Train(t) = cli.into_command() else { panic!("not train") };
            assert_eq!(t.config.k, Some(2));
        }
        let cli = parse(&["-q", "plan", "--k", "2"]).unwrap();
        assert!(matches!(cli.into_command(), Command::Plan(p) if p.config.k == Some(2)));
        let e = parse(&["--k", "2", "--data-dir", "d", "plan"]).unwrap_err().to_string();
        assert!(e.contains("--data-dir, --k given before `plan`"), "{e}");
    }

    #[test]
    fn json_takes_an_optional_file() {
        let cli = Cli::try_parse_from(["mlaan-pipe", "plan", "--json", "--k", "2"]).unwrap();
        let Command::Plan(p) = cli.into_command() else { panic!("not plan") };
        assert_eq!(p.json.as_deref(), Some(std::path::Path::new("-")));
        assert_eq!(p.config.k, Some(2));
        let cli = Cli::try_parse_from(["mlaan-pipe", "eval", "--model", "m", "--json", "r.json"])
            .unwrap();
        let Command::Eval(e) = cli.into_command() else { panic!("not eval") };
        assert_eq!(e.json.as_deref(), Some(std::path::Path::new("r.json")));
    }
}

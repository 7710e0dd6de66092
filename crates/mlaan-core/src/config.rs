//! The run configuration: typed sections with defaults, read from TOML, overridden from the
//! command line, validated once, and written into the run directory as resolved.
//!
//! Precedence: command-line flags > `--set section.key=value` > config file > defaults.
//! Unknown keys and values of the wrong type are errors that quote them.

use crate::device::DeviceSpec;
use crate::error::ConfigError;
use crate::lam::LamConfig;
use crate::split::SplitSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything that defines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub method: MethodConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub pipeline: PipelineConfig,
    pub checkpoint: CheckpointConfig,
    pub distributed: DistributedConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `resnet20`, `resnet32`, `resnet110`, `resnet34`, ... (see `ArchSpec::from_name`).
    pub arch: String,
    /// Number of gradient-isolated modules.
    pub k: usize,
    /// How the backbone is cut into K modules.
    pub split: SplitSpec,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { arch: "resnet32".into(), k: 1, split: SplitSpec::default() }
    }
}

/// The training method (docs/method.md §3–4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    E2e,
    Dgl,
    Infopro,
    MlaanDgl,
    MlaanInfopro,
}

impl Method {
    pub const ALL: [Method; 5] =
        [Method::E2e, Method::Dgl, Method::Infopro, Method::MlaanDgl, Method::MlaanInfopro];

    pub fn is_mlaan(self) -> bool {
        matches!(self, Method::MlaanDgl | Method::MlaanInfopro)
    }
    /// InfoPro's local loss (decoder + classifier) is the base objective.
    pub fn uses_infopro_loss(self) -> bool {
        matches!(self, Method::Infopro | Method::MlaanInfopro)
    }
    pub fn is_local(self) -> bool {
        self != Method::E2e
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::E2e => "e2e",
            Method::Dgl => "dgl",
            Method::Infopro => "infopro",
            Method::MlaanDgl => "mlaan-dgl",
            Method::MlaanInfopro => "mlaan-infopro",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            format!("unknown method `{s}` (e2e, dgl, infopro, mlaan-dgl, mlaan-infopro)")
        })
    }
}

/// Which snapshot of its real block an EMA twin folds in after step b (docs/design.md,
/// "Stages and schedules").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmaLagRule {
    /// [`EmaLagRule::Exact`] for sequential, [`EmaLagRule::Distance`] for sync,
    /// [`EmaLagRule::Latest`] for async.
    Auto,
    /// The real block after step b (docs/method.md §4 to the letter; the twin's stage waits
    /// for the source's step).
    Exact,
    /// The real block after step b − (j − i), j the source module, i the twin's: what a
    /// pipeline has at hand without waiting.
    Distance,
    /// Whatever snapshot has arrived.
    Latest,
}

impl EmaLagRule {
    /// The rule `schedule` uses: `auto` resolved, any other rule as it is.
    pub fn resolve(self, schedule: Schedule) -> EmaLagRule {
        match (self, schedule) {
            (EmaLagRule::Auto, Schedule::Sequential) => EmaLagRule::Exact,
            (EmaLagRule::Auto, Schedule::Sync) => EmaLagRule::Distance,
            (EmaLagRule::Auto, Schedule::Async) => EmaLagRule::Latest,
            (rule, _) => rule,
        }
    }
}

/// Which EMA twins follow their real block (MLAAN). The official code differs between its
/// variants: its CIFAR code updates only the last step's twin and leaves the others frozen
/// copies of their block at initialisation; its ImageNet code updates all (docs/method.md §4,
/// docs/method-comparison.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmaUpdate {
    /// Every twin folds in its real block after every step.
    All,
    /// Only the twin of the last step with a LAM chain; the others stay as initialised.
    Last,
    /// No twin moves: each stays the copy of its block at initialisation.
    None,
}

impl EmaUpdate {
    pub fn name(self) -> &'static str {
        match self {
            EmaUpdate::All => "all",
            EmaUpdate::Last => "last",
            EmaUpdate::None => "none",
        }
    }
}

/// How modules are grouped onto stages when there are more modules than devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementRule {
    /// A measured profile of each module (the default).
    Auto,
    /// Backbone multiply-accumulates per sample; no profile run.
    Flops,
    /// A measured profile, as `auto`.
    Profile,
}

impl std::fmt::Display for PlacementRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlacementRule::Auto => "auto",
            PlacementRule::Flops => "flops",
            PlacementRule::Profile => "profile",
        })
    }
}

/// Classifier head of a local module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadKind {
    /// Global average pool + linear.
    GapFc,
    /// InfoPro's head: 3x3 conv + BN + ReLU + GAP + FC(128) + ReLU + FC.
    #[serde(rename = "1c2f")]
    OneConvTwoFc,
    /// The DGL paper's deeper head: two 3x3 conv layers, 2x2 average pool, 3-layer MLP.
    Dgl,
}

/// How InfoPro's classification term is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InfoProMode {
    Softmax,
    Contrast,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    pub name: Method,
    /// Classifier head; default `gap-fc` for DGL-based methods, `1c2f` for InfoPro-based.
    pub head: Option<HeadKind>,
    pub infopro_mode: InfoProMode,
    /// MLAAN on InfoPro: the mode of the independent loss alone (unset: `infopro_mode`). The
    /// official code's independent head is always the contrastive one.
    pub independent_mode: Option<InfoProMode>,
    /// InfoPro's (λ1, λ2) at module 0; interpolated linearly to `lambda_last` at module K-2.
    pub lambda_first: [f64; 2],
    pub lambda_last: [f64; 2],
    /// Temperature of the supervised-contrastive loss.
    pub contrast_temperature: f64,
    /// MLAAN: weight of the independent auxiliary loss.
    pub w_ind: f64,
    /// MLAAN: weight of the cascade auxiliary loss.
    pub w_casc: f64,
    /// MLAAN: how many modules a cascade loss reaches (d).
    pub cascade_depth: usize,
    /// MLAAN with d = 3: whether step 1, whose cascade cannot reach three modules, still gets
    /// an independent loss and a cascade of reach 1. The official code gives it no loss at
    /// all (module 1 then learns from step 2's cascade alone), which is the default.
    pub early_cascades: bool,
    /// MLAAN: EMA momentum m of the twins (`p_ema ← m·p_ema + (1−m)·p_real`).
    pub ema_momentum: f64,
    /// Which real-block weights a twin folds in after step b.
    pub ema_lag: EmaLagRule,
    /// Which twins are updated at all (`all`, or the official CIFAR code's `last`, or `none`).
    pub ema_update: EmaUpdate,
    pub lam: LamConfig,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            name: Method::E2e,
            head: None,
            infopro_mode: InfoProMode::Softmax,
            independent_mode: None,
            lambda_first: [5.0, 0.05],
            lambda_last: [0.2, 0.5],
            contrast_temperature: 0.07,
            w_ind: 0.001,
            w_casc: 0.999,
            cascade_depth: 2,
            early_cascades: false,
            ema_momentum: 0.995,
            ema_lag: EmaLagRule::Auto,
            ema_update: EmaUpdate::All,
            lam: LamConfig::default(),
        }
    }
}

impl MethodConfig {
    pub fn head_kind(&self) -> HeadKind {
        self.head.unwrap_or(if self.name.uses_infopro_loss() {
            HeadKind::OneConvTwoFc
        } else {
            HeadKind::GapFc
        })
    }

    /// InfoPro's (λ1, λ2) for module `i` of `k` (linear from module 0 to module K-2).
    pub fn lambdas(&self, i: usize, k: usize) -> (f64, f64) {
        let t = if k > 2 { i as f64 / (k - 2) as f64 } else { 0.0 };
        let lerp = |a: f64, b: f64| a + (b - a) * t;
        (
            lerp(self.lambda_first[0], self.lambda_last[0]),
            lerp(self.lambda_first[1], self.lambda_last[1]),
        )
    }
}

/// What to do with a sample that cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBadSample {
    Stop,
    Skip,
}

/// Border fill of the padded random crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PadMode {
    Zero,
    Reflect,
}

/// Training-time augmentation; `None` fields take the dataset's default (docs/method.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Turn all training augmentation off.
    pub disable: bool,
    pub crop_padding: Option<usize>,
    pub pad_mode: Option<PadMode>,
    pub flip: Option<bool>,
    /// Side of the random-resized / centre crop (ImageNet-style datasets).
    pub crop_size: Option<usize>,
    /// Side the evaluation image is resized to before the centre crop.
    pub eval_resize: Option<usize>,
}

/// Pillow's `Image.MAX_IMAGE_PIXELS` doubled, above which Pillow refuses to open an image
/// (`DecompressionBombError`): the default of `data.max_image_pixels`.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `fashion-mnist`, `mnist`, `cifar10`, `cifar100`, `svhn`, `stl10`, `imagenet`,
    /// `imagefolder`, `synthetic`.
    pub dataset: String,
    /// Where the files are; `None` picks the dataset's default location.
    pub dir: Option<PathBuf>,
    /// Decoder threads; 0 = choose from the cores available.
    pub workers: usize,
    /// Batches decoded ahead of the trainer.
    pub prefetch: usize,
    pub augment: AugmentConfig,
    /// Per-channel mean and std in [0,1] units; `None` = dataset default.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub on_bad_sample: OnBadSample,
    /// Image folders: images of more pixels are refused before they are decoded (a
    /// decompression bomb is a bad sample). Default [`DEFAULT_MAX_IMAGE_PIXELS`].
    pub max_image_pixels: u64,
    /// Use only the first N training samples (quick experiments); 0 = all.
    pub train_limit: usize,
    /// Use only the first N test samples; 0 = all.
    pub test_limit: usize,
    /// SVHN: also train on `extra_32x32.mat`.
    pub svhn_extra: bool,
    /// CIFAR-100: `fine` (100 classes) or `coarse` (20 superclasses).
    pub cifar100_labels: String,
    /// Synthetic dataset: samples, classes, image side and channels.
    pub synthetic_samples: usize,
    pub synthetic_classes: usize,
    pub synthetic_size: usize,
    pub synthetic_channels: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "fashion-mnist".into(),
            dir: None,
            workers: 0,
            prefetch: 4,
            augment: AugmentConfig::default(),
            mean: None,
            std: None,
            on_bad_sample: OnBadSample::Stop,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            train_limit: 0,
            test_limit: 0,
            svhn_extra: false,
            cifar100_labels: "fine".into(),
            synthetic_samples: 2048,
            synthetic_classes: 10,
            synthetic_size: 32,
            synthetic_channels: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Linear warm-up length in epochs (fractions allowed).
    pub warmup_epochs: f64,
    /// Learning rate at the start of the warm-up.
    pub warmup_start_lr: f64,
    /// Floor of the cosine schedule.
    pub min_lr: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
            warmup_epochs: 0.0,
            warmup_start_lr: 0.01,
            min_lr: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Evaluation batch size; 0 = same as training.
    pub eval_batch_size: usize,
    pub seed: u64,
    /// Write a metrics record every N optimizer steps.
    pub log_every: usize,
    /// Stop after this many steps (0 = run all epochs); the schedule still spans all epochs.
    pub max_steps: usize,
    /// Evaluate on the test set after every epoch (otherwise only at the end).
    pub eval_every_epoch: bool,
    /// Write TensorBoard event files (`events.out.tfevents.*`) into the run directory.
    pub tensorboard: bool,
    /// Compute dtype: `bf16` and `fp16` run each stage under autocast with float32 master
    /// weights, optimizer state and EMA twins; `fp16` adds a dynamic loss scale per module.
    pub precision: Precision,
    /// Layout of convolution activations and weights (`channels-last` is what cuDNN's tensor
    /// cores want; on CPU it gives the same numbers in another layout).
    pub memory_format: MemoryFormat,
    /// cuDNN's autotuner (CUDA only): picks the fastest convolution kernel per shape once.
    pub cudnn_benchmark: bool,
    /// TF32 in float32 matrix products and convolutions (CUDA only).
    pub tf32: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 128,
            eval_batch_size: 0,
            seed: 0,
            log_every: 20,
            max_steps: 0,
            eval_every_epoch: false,
            tensorboard: true,
            precision: Precision::Fp32,
            memory_format: MemoryFormat::Contiguous,
            cudnn_benchmark: true,
            tf32: true,
        }
    }
}

/// The dtype stages compute in (`train.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

/// Layout of 4-d activations and convolution weights (`train.memory_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryFormat {
    Contiguous,
    ChannelsLast,
}

impl std::fmt::Display for MemoryFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryFormat::Contiguous => "contiguous",
            MemoryFormat::ChannelsLast => "channels-last",
        })
    }
}

/// Which CUDA stream a stage thread queues its kernels on (`pipeline.streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMode {
    /// Its own stream from libtorch's pool, so that stages sharing a GPU overlap.
    PerStage,
    /// The device's default stream, shared by every stage on it.
    Default,
}

impl std::fmt::Display for StreamMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamMode::PerStage => "per-stage",
            StreamMode::Default => "default",
        })
    }
}

/// How a run computes, as `plan` prints it and `summary.json` records it: the compute dtype
/// and layout everywhere, and the CUDA-only switches (`cuda = false`: they had no effect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeReport {
    pub precision: Precision,
    pub memory_format: MemoryFormat,
    pub streams: StreamMode,
    pub cudnn_benchmark: bool,
    pub tf32: bool,
    /// Whether any stage runs on a CUDA device.
    pub cuda: bool,
}

impl ComputeReport {
    pub fn of(cfg: &RunConfig) -> Self {
        ComputeReport {
            precision: cfg.train.precision,
            memory_format: cfg.train.memory_format,
            streams: cfg.pipeline.streams,
            cudnn_benchmark: cfg.train.cudnn_benchmark,
            tf32: cfg.train.tf32,
            cuda: cfg.pipeline.devices.iter().any(|d| matches!(d, DeviceSpec::Cuda(_))),
        }
    }
}

impl std::fmt::Display for ComputeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "{}, {}; CUDA: {}, cuDNN benchmark {}, TF32 {}",
            self.precision,
            self.memory_format,
            match self.streams {
                StreamMode::PerStage => "a stream per stage",
                StreamMode::Default => "the default stream",
            },
            on(self.cudnn_benchmark),
            on(self.tf32)
        )?;
        if !self.cuda {
            f.write_str(" (no CUDA device: unused)")?;
        }
        Ok(())
    }
}

/// How the modules are scheduled (docs/design.md, "Stages and schedules").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Sequential,
    Sync,
    Async,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Sequential => "sequential",
            Schedule::Sync => "sync",
            Schedule::Async => "async",
        })
    }
}

/// What a stage does with a non-finite loss: fail the run, or drop the batch from that module
/// on (every later module drops it too; see docs/design.md, "A non-finite loss").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub schedule: Schedule,
    /// Devices, e.g. `["cpu"]`, `["cpu","cpu"]`, `["cuda:0","cuda:1"]`; parsed once, here.
    pub devices: Vec<DeviceSpec>,
    /// Batches a stage may hold in flight (channel capacity, stored inputs, gradient lag).
    pub in_flight: usize,
    pub placement: PlacementRule,
    /// Intra-op threads for CPU devices; 0 = cores divided among the CPU stages.
    pub intra_op_threads: usize,
    pub on_nonfinite: OnNonFinite,
    /// Under `on_nonfinite = "skip"`: stop the run when this many batches in a row had a
    /// non-finite loss (0: never).
    pub max_consecutive_skips: usize,
    /// Micro-batches per mini-batch (`sync` or `sequential`): every module accumulates its
    /// gradients over them and steps once per mini-batch. With `e2e` and K > 1 this is the
    /// GPipe baseline; for any method, the single-process reference of data parallelism.
    pub micro_batches: usize,
    /// Trade compute for memory: forward without keeping the module's graph and rebuild it
    /// for the backward passes (one more forward per batch), so that the module's graph and
    /// its auxiliary networks' graphs are never held together.
    pub recompute: bool,
    /// CUDA stream of each stage thread; no effect on CPU.
    pub streams: StreamMode,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            schedule: Schedule::Async,
            devices: vec![DeviceSpec::Cpu],
            in_flight: 2,
            placement: PlacementRule::Auto,
            intra_op_threads: 0,
            on_nonfinite: OnNonFinite::Stop,
            max_consecutive_skips: 10,
            micro_batches: 1,
            recompute: false,
            streams: StreamMode::PerStage,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint every N steps; 0 = only at epoch ends (if `at_epoch_end`).
    pub every_steps: usize,
    pub at_epoch_end: bool,
    /// Complete checkpoints kept; older ones are deleted.
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every_steps: 0, at_epoch_end: true, keep_last: 3 }
    }
}

/// Data-parallel replicas of the pipeline, one process each (launched by torchrun, SLURM or
/// `mlaan-pipe launch`, which say how many; see docs/distributed.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Processes (replicas) the run expects; 0 = as many as the launcher started. The
    /// resolved config records the launched number.
    pub world_size: usize,
    /// Seconds a collective or the start-up rendezvous waits for a peer before failing.
    pub timeout_s: f64,
    /// Gradients are all-reduced in flat buckets of at most this many MiB.
    pub bucket_mb: f64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig { world_size: 0, timeout_s: 300.0, bucket_mb: 25.0 }
    }
}

/// A finite number > 0 (false for NaN).
fn is_positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// A finite number ≥ 0 (false for NaN).
fn is_non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

/// Set `dotted.key = value` in a TOML table; `value` is parsed as TOML, or taken as a string.
pub fn set_dotted(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |reason: &str| ConfigError::Override { arg: arg.to_string(), reason: reason.into() };
    let (key, raw) = arg.split_once('=').ok_or_else(|| err("expected section.key=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value = parse_value(raw);
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("empty key"));
    }
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        let entry =
            t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| err(&format!("`{p}` is not a section")))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// The typed config of a TOML table.
fn typed(table: &toml::Table) -> Result<RunConfig, toml::de::Error> {
    toml::Value::Table(table.clone()).try_into()
}

/// A key or type error of `origin`, in the words of a config rather than of serde.
fn schema_error(origin: String, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace("unknown field", "unknown key");
    ConfigError::Schema { origin, message }
}

fn parse_value(raw: &str) -> toml::Value {
    // Parse as a TOML value by wrapping it in a one-key document; bare words become strings.
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

impl RunConfig {
    /// Build the config: defaults, then `file`, then each `key=value` of `overrides` in order.
    /// An unknown key or a value of the wrong type is blamed on the input that brought it:
    /// the file (with its line) or the one override.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let table = text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                toml::from_str::<RunConfig>(&text).map_err(|e| {
                    let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
                    let at = line.map_or(String::new(), |l| format!(", line {l}"));
                    schema_error(format!("config file {}{at}", path.display()), &e)
                })?;
                table
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            set_dotted(&mut table, o)?;
            typed(&table).map_err(|e| schema_error(format!("command-line setting `{o}`"), &e))?;
        }
        let cfg = typed(&table).map_err(|e| schema_error("config".into(), &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check values that types alone cannot; the message names the key and quotes the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &str, value: impl std::fmt::Debug, reason: &str) -> ConfigError {
            ConfigError::BadValue {
                key: key.into(),
                value: format!("{value:?}"),
                reason: reason.into(),
            }
        }
        let m = &self.method;
        if self.model.k == 0 {
            return Err(bad("model.k", self.model.k, "must be at least 1"));
        }
        // Whether the network can be cut as asked comes before what the method does with it.
        let arch = crate::arch::ArchSpec::from_name(&self.model.arch)
            .map_err(|e| bad("model.arch", &self.model.arch, &e.to_string()))?;
        crate::split::Split::resolve(&arch, self.model.k, &self.model.split).map_err(|e| {
            match &self.model.split {
                SplitSpec::Named(n) if n == "auto" => bad("model.k", self.model.k, &e.to_string()),
                split => bad("model.split", split, &e.to_string()),
            }
        })?;
        if m.name.is_local() && self.model.k < 2 {
            return Err(bad(
                "model.k",
                self.model.k,
                &format!("method {} needs at least 2 modules", m.name),
            ));
        }
        if m.name.is_mlaan() && !(2..=3).contains(&m.cascade_depth) {
            return Err(bad("method.cascade_depth", m.cascade_depth, "must be 2 or 3"));
        }
        for (key, v) in [("method.w_ind", m.w_ind), ("method.w_casc", m.w_casc)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(key, v, "must be a finite number ≥ 0"));
            }
        }
        if !(0.0..1.0).contains(&m.ema_momentum) {
            return Err(bad("method.ema_momentum", m.ema_momentum, "must be in [0, 1)"));
        }
        if let (Some(mode), false) = (m.independent_mode, m.name == Method::MlaanInfopro) {
            return Err(bad(
                "method.independent_mode",
                mode,
                "applies to mlaan-infopro only (the independent loss of MLAAN on InfoPro)",
            ));
        }
        if !is_positive(m.contrast_temperature) {
            return Err(bad("method.contrast_temperature", m.contrast_temperature, "must be > 0"));
        }
        if !(0.0..=1.0).contains(&m.lam.pyramid) {
            return Err(bad("method.lam.pyramid", m.lam.pyramid, "must be in [0, 1]"));
        }
        if m.lam.depth == 0 {
            return Err(bad("method.lam.depth", m.lam.depth, "must be at least 1"));
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(bad("optim.lr", o.lr, "must be a finite number > 0"));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(bad("optim.momentum", o.momentum, "must be in [0, 1)"));
        }
        if !is_non_negative(o.weight_decay) {
            return Err(bad("optim.weight_decay", o.weight_decay, "must be ≥ 0"));
        }
        if !is_non_negative(o.warmup_epochs) {
            return Err(bad("optim.warmup_epochs", o.warmup_epochs, "must be ≥ 0"));
        }
        let t = &self.train;
        if t.epochs == 0 {
            return Err(bad("train.epochs", t.epochs, "must be at least 1"));
        }
        if t.batch_size == 0 {
            return Err(bad("train.batch_size", t.batch_size, "must be at least 1"));
        }
        if t.log_every == 0 {
            return Err(bad("train.log_every", t.log_every, "must be at least 1"));
        }
        let p = &self.pipeline;
        if p.in_flight == 0 {
            return Err(bad("pipeline.in_flight", p.in_flight, "must be at least 1"));
        }
        if p.devices.is_empty() {
            return Err(bad("pipeline.devices", &p.devices, "needs at least one device"));
        }
        if p.micro_batches == 0 || !self.train.batch_size.is_multiple_of(p.micro_batches) {
            return Err(bad(
                "pipeline.micro_batches",
                p.micro_batches,
                &format!("must be ≥ 1 and divide train.batch_size ({})", self.train.batch_size),
            ));
        }
        if p.micro_batches > 1 && p.schedule == Schedule::Async {
            return Err(bad(
                "pipeline.micro_batches",
                p.micro_batches,
                "gradient accumulation over micro-batches (GPipe for e2e) needs schedule sync \
                 or sequential: async steps on every batch",
            ));
        }
        if m.name == Method::E2e && self.model.k > 1 && p.schedule == Schedule::Async {
            return Err(bad(
                "pipeline.schedule",
                "async",
                "e2e over several modules is pipelined backprop (GPipe): use sync",
            ));
        }
        if self.data.max_image_pixels == 0 {
            return Err(bad("data.max_image_pixels", self.data.max_image_pixels, "must be > 0"));
        }
        if !["fine", "coarse"].contains(&self.data.cifar100_labels.as_str()) {
            return Err(bad("data.cifar100_labels", &self.data.cifar100_labels, "fine or coarse"));
        }
        if let (Some(mean), Some(std)) = (&self.data.mean, &self.data.std) {
            if mean.len() != std.len() {
                return Err(bad("data.std", std, "must have as many entries as data.mean"));
            }
        }
        if self.data.std.as_ref().is_some_and(|s| s.iter().any(|&x| !is_positive(f64::from(x)))) {
            return Err(bad("data.std", &self.data.std, "every entry must be > 0"));
        }
        if !is_positive(self.distributed.timeout_s) {
            return Err(bad("distributed.timeout_s", self.distributed.timeout_s, "must be > 0"));
        }
        if !is_positive(self.distributed.bucket_mb) {
            return Err(bad("distributed.bucket_mb", self.distributed.bucket_mb, "must be > 0"));
        }
        if self.checkpoint.keep_last == 0 {
            return Err(bad("checkpoint.keep_last", self.checkpoint.keep_last, "must be ≥ 1"));
        }
        Ok(())
    }

    /// The resolved config as TOML, for the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, overrides: &[&str]) -> Result<RunConfig, ConfigError> {
        let dir = std::env::temp_dir().join(format!("mlaan-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("c{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        RunConfig::load(Some(&path), &o)
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = RunConfig::default();
        c.validate().unwrap();
        let back: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn file_then_overrides() {
        let c = load(
            "[model]\narch = \"resnet110\"\nk = 4\n[method]\nname = \"mlaan-dgl\"\n",
            &["model.k=8", "optim.lr=0.05", "method.head=1c2f"],
        )
        .unwrap();
        assert_eq!(c.model.arch, "resnet110");
        assert_eq!(c.model.k, 8);
        assert_eq!(c.optim.lr, 0.05);
        assert_eq!(c.method.name, Method::MlaanDgl);
        assert_eq!(c.method.head_kind(), HeadKind::OneConvTwoFc);
    }

    #[test]
    fn unknown_keys_are_quoted() {
        let e = load("[optim]\nlrr = 0.1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("lrr"), "{e}");
        let e = load("[optimizer]\nlr = 0.1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("optimizer"), "{e}");
        let e = load("", &["train.epoch=3"]).unwrap_err().to_string();
        assert!(e.contains("epoch"), "{e}");
        // Each error names the input that brought the key, and calls it unknown.
        let e = load("[train]\nepochs = 2\n", &["model.k=2", "optim.lrr=0.1"]).unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("command-line setting `optim.lrr=0.1`: unknown key `lrr`"), "{e}");
        let e = load("[train]\nepochs = 2\n\n[optim]\nlrr = 0.1\n", &[]).unwrap_err();
        let e = e.to_string();
        assert!(e.contains(", line 5: unknown key `lrr`") && !e.contains("TOML"), "{e}");
    }

    #[test]
    fn ema_lag_and_placement_are_typed() {
        let c = load("[method]\nema_lag = \"distance\"\n", &["pipeline.placement=flops"]).unwrap();
        assert_eq!(
            (c.method.ema_lag, c.pipeline.placement),
            (EmaLagRule::Distance, PlacementRule::Flops)
        );
        let e = load("", &["method.ema_lag=soon"]).unwrap_err().to_string();
        assert!(e.contains("`method.ema_lag=soon`") && e.contains("`latest`"), "{e}");
        let e = load("[pipeline]\nplacement = \"random\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("random") && e.contains("`flops`"), "{e}");
        let resolved: Vec<EmaLagRule> = [Schedule::Sequential, Schedule::Sync, Schedule::Async]
            .map(|s| EmaLagRule::Auto.resolve(s))
            .into();
        assert_eq!(resolved, [EmaLagRule::Exact, EmaLagRule::Distance, EmaLagRule::Latest]);
        assert_eq!(EmaLagRule::Latest.resolve(Schedule::Sync), EmaLagRule::Latest);
    }

    #[test]
    fn an_impossible_split_is_reported_before_method_rules() {
        // e2e (the default method) with K > 1 under async would be refused too, but the K
        // that the architecture cannot give is the first thing to fix.
        let e = load("", &["model.k=99"]).unwrap_err().to_string();
        assert!(e.contains("model.k") && e.contains("99") && e.contains("15 blocks"), "{e}");
        let e = load("", &["model.arch=\"resnet7\""]).unwrap_err().to_string();
        assert!(e.contains("model.arch") && e.contains("resnet7"), "{e}");
    }

    #[test]
    fn bad_values_are_quoted() {
        let e = load("[optim]\nlr = -1.0\n", &[]).unwrap_err().to_string();
        assert!(e.contains("optim.lr") && e.contains("-1"), "{e}");
        let e = load("[method]\nname = \"backprop\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("backprop"), "{e}");
        let e = load("[train]\nbatch_size = \"big\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("big") || e.contains("batch_size"), "{e}");
        let e = load("[method]\nname = \"dgl\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("model.k"), "{e}");
        let e = load("", &["pipeline.devices=[\"tpu:0\"]"]).unwrap_err().to_string();
        assert!(e.contains("tpu"), "{e}");
        let e = load("[model\n", &[]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn compute_settings_are_typed_and_bad_values_quoted() {
        let c = load(
            "[train]\nprecision = \"bf16\"\nmemory_format = \"channels-last\"\n",
            &["pipeline.streams=default", "train.tf32=false"],
        )
        .unwrap();
        assert_eq!(c.train.precision, Precision::Bf16);
        assert_eq!(c.train.memory_format, MemoryFormat::ChannelsLast);
        assert_eq!(c.pipeline.streams, StreamMode::Default);
        assert!(!c.train.tf32 && c.train.cudnn_benchmark);
        let d = RunConfig::default();
        assert_eq!(
            (d.train.precision, d.train.memory_format, d.pipeline.streams),
            (Precision::Fp32, MemoryFormat::Contiguous, StreamMode::PerStage)
        );
        for (o, quoted, expected) in [
            ("train.precision=bf17", "`bf17`", "`bf16`"),
            ("train.memory_format=nhwc", "`nhwc`", "`channels-last`"),
            ("pipeline.streams=many", "`many`", "`per-stage`"),
        ] {
            let e = load("", &[o]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{o}`")) && e.contains(quoted) && e.contains(expected),
                "{e}"
            );
        }
        let e = load("[train]\n\nprecision = \"half\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("`half`"), "{e}");
        let e = load("", &["train.cudnn_benchmark=\"yes\""]).unwrap_err().to_string();
        assert!(e.contains("cudnn_benchmark") && e.contains("yes"), "{e}");
    }

    #[test]
    fn override_syntax_errors() {
        let mut t = toml::Table::new();
        assert!(set_dotted(&mut t, "no-equals").is_err());
        assert!(set_dotted(&mut t, "a..b=1").is_err());
        set_dotted(&mut t, "a.b=1").unwrap();
        assert!(set_dotted(&mut t, "a.b.c=1").is_err());
        set_dotted(&mut t, "data.dataset=cifar10").unwrap();
        assert_eq!(t["data"]["dataset"].as_str(), Some("cifar10"));
    }

    #[test]
    fn lambda_interpolates_from_first_to_module_k_minus_2() {
        let m = MethodConfig::default();
        assert_eq!(m.lambdas(0, 16), (5.0, 0.05));
        let (a, b) = m.lambdas(14, 16);
        assert!((a - 0.2).abs() < 1e-12 && (b - 0.5).abs() < 1e-12);
        let (a, b) = m.lambdas(7, 16);
        assert!((a - 2.6).abs() < 1e-12 && (b - 0.275).abs() < 1e-12);
    }
}

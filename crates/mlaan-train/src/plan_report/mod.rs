//! What a config would train, without training it: the split, every module's blocks and
//! losses (with how far back each gradient reaches), the LAM chains and their EMA twins, exact
//! parameter counts (every module is built on the CPU and counted), activation sizes, MACs,
//! and the placement on the devices the trainer would choose. [`build`] measures it as data
//! (`mlaan-pipe plan --json`), [`render`] writes it for a terminal.

mod render;

pub use render::render;

use crate::flops::{module_flops, ModuleFlops};
use crate::placement::choose_placement;
use anyhow::Result;
use mlaan_core::arch::{BlockRef, Chw};
use mlaan_core::config::{ComputeReport, HeadKind, Method, PlacementRule, RunConfig, Schedule};
use mlaan_core::device::{cpu_threads_per_stage, DeviceSpec};
use mlaan_core::lam::pyramid_depth;
use mlaan_core::plan::{ImageSpec, NetworkPlan, ObjectiveSpec, TermKind};
use mlaan_engine::init::build_nets;
use serde::Serialize;
use tch::Device;

/// Parameter counts of one module (or a sum of them).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Params {
    /// Stem, blocks and final classifier.
    pub backbone: usize,
    /// Heads and decoders of the auxiliary losses.
    pub aux: usize,
    /// Trainable LAM copies of later blocks.
    pub lam: usize,
    /// EMA twins (frozen).
    pub ema: usize,
}

impl Params {
    fn add(&mut self, o: &Params) {
        self.backbone += o.backbone;
        self.aux += o.aux;
        self.lam += o.lam;
        self.ema += o.ema;
    }
}

/// A loss term of a module.
#[derive(Debug, Clone, Serialize)]
pub struct TermReport {
    pub kind: TermKind,
    pub weight: f64,
    /// Number of earlier modules its gradient reaches.
    pub reach: usize,
    /// The modules its gradient reaches (this one included).
    pub reaches: Vec<usize>,
    pub objective: ObjectiveSpec,
    /// Backbone blocks the LAM of this term copies (cascade terms of MLAAN).
    pub lam_chain: Option<Vec<BlockRef>>,
    /// Module that owns the real block the EMA twin follows.
    pub ema_source_module: Option<usize>,
    /// Whether that twin follows its block (`method.ema_update`) or stays frozen.
    pub ema_follows: Option<bool>,
}

/// A loss of some module whose gradient reaches this one.
#[derive(Debug, Clone, Serialize)]
pub struct TrainedBy {
    pub module: usize,
    pub term: TermKind,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub index: usize,
    pub with_stem: bool,
    pub blocks: Vec<BlockRef>,
    pub with_classifier: bool,
    /// Shape of h_i for one sample.
    pub output: Chw,
    /// Bytes of h_i for one batch in float32.
    pub activation_bytes: u64,
    /// Backbone multiply-accumulates per sample.
    pub macs_per_sample: f64,
    /// Counted arithmetic of a training step (see `crate::flops`).
    pub flops: ModuleFlops,
    pub params: Params,
    pub terms: Vec<TermReport>,
    pub trained_by: Vec<TrainedBy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: usize,
    pub device: String,
    /// First and one-past-last module.
    pub modules: [usize; 2],
    pub macs_per_sample: f64,
    /// Training FLOPs per sample of the stage's modules.
    pub train_flops_per_sample: f64,
    pub params: Params,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlacementReport {
    pub devices: Vec<String>,
    /// The rule that placed the modules: `pipeline.placement`, or `flops` when the devices
    /// to profile on are not here.
    pub rule: PlacementRule,
    /// False when a requested GPU is not visible here (the placement is still computed).
    pub devices_available: bool,
    pub note: Option<String>,
    pub stages: Vec<StageReport>,
    pub cpu_stages: usize,
    /// Intra-op threads each CPU stage would get.
    pub intra_op_threads: usize,
}

/// How a node's processes split its devices (with more than one per node).
#[derive(Debug, Clone, Serialize)]
pub struct ReplicasReport {
    pub per_node: usize,
    /// Each local rank's devices; the placement shown is of local rank 0's.
    pub slices: Vec<Vec<String>>,
}

/// Everything `plan` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// Where the config came from: a config file, a dataset's recipe, or the defaults.
    pub config_source: String,
    pub arch: String,
    /// The backbone in words (kind, units, widths).
    pub architecture: String,
    /// Whether activations are token sequences (a ViT's; shapes are then tokens × width).
    pub tokens: bool,
    /// Units per stage and each stage's output width.
    pub depths: Vec<usize>,
    pub widths: Vec<usize>,
    pub dataset: String,
    /// Set when the dataset's files are not here: shapes and classes then come from the
    /// dataset's definition.
    pub data_note: Option<String>,
    pub input: Chw,
    pub num_classes: usize,
    pub k: usize,
    pub split_source: String,
    /// Last block of modules 0..K-2.
    pub split_ends: Vec<BlockRef>,
    pub method: Method,
    pub head: HeadKind,
    pub schedule: Schedule,
    /// `pipeline.placement`.
    pub placement_rule: PlacementRule,
    pub in_flight: usize,
    pub batch_size: usize,
    /// `train.precision`, `train.memory_format`, `pipeline.streams`, cuDNN benchmark, TF32.
    pub compute: ComputeReport,
    /// How the LAM chains were derived; `None` without MLAAN.
    pub lam_rule: Option<String>,
    pub modules: Vec<ModuleReport>,
    pub total: Params,
    /// `ArchSpec::total_params` for this input and class count (equals `total.backbone`).
    pub arch_params: usize,
    pub placement: PlacementReport,
    pub replicas: Option<ReplicasReport>,
    /// How replicas would reduce their gradients (`distributed.backend`, and whether NCCL
    /// loads here).
    pub collectives: String,
}

/// Derive the plan of `cfg` and measure it, for `per_node` data-parallel processes per node.
pub fn build(cfg: &RunConfig, source: &str, per_node: usize) -> Result<PlanReport> {
    let (info, data_note) = dataset_info(cfg)?;
    let image = info.image();
    let plan = NetworkPlan::new(cfg, image.chw(), image.classes)?;
    let batch = cfg.train.batch_size as u64;
    let macs = plan.module_macs();
    let flops = module_flops(&plan, image, cfg.pipeline.recompute)?;
    let mut modules = Vec::with_capacity(plan.k());
    for (m, spec) in plan.modules.iter().enumerate() {
        let params = {
            let nets = build_nets(&plan, m, image, Device::Cpu);
            Params {
                backbone: nets.count_params(|n| !n.starts_with("aux.")),
                aux: nets.count_params(|n| n.starts_with("aux.") && !is_lam(n)),
                lam: nets.count_params(is_lam),
                ema: nets.ema_param_count(),
            }
        };
        let terms = spec
            .terms
            .iter()
            .map(|t| TermReport {
                kind: t.kind,
                weight: t.weight,
                reach: t.reach,
                reaches: (m - t.reach.min(m)..=m).collect(),
                objective: t.objective.clone(),
                lam_chain: t.lam.as_ref().map(|l| l.chain.blocks.clone()),
                ema_source_module: t.lam.as_ref().map(|l| l.chain.ema_source_module),
                ema_follows: t.lam.as_ref().map(|l| l.chain.ema_follows),
            })
            .collect();
        modules.push(ModuleReport {
            index: m,
            with_stem: spec.with_stem,
            blocks: spec.block_refs.clone(),
            with_classifier: spec.with_classifier,
            output: spec.output,
            activation_bytes: spec.output.numel() as u64 * batch * 4,
            macs_per_sample: macs[m],
            flops: flops[m],
            params,
            terms,
            trained_by: trained_by(&plan, m),
        });
    }
    let mut total = Params::default();
    for m in &modules {
        total.add(&m.params);
    }
    let per_node = per_node.max(1);
    let slices = (0..per_node)
        .map(|r| DeviceSpec::node_slice(&cfg.pipeline.devices, r, per_node))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let mut replica_cfg = cfg.clone();
    replica_cfg.pipeline.devices = slices[0].clone();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = placement(&replica_cfg, &plan, &modules, image, (cores / per_node).max(1))?;
    let replicas = (per_node > 1).then(|| ReplicasReport {
        per_node,
        slices: slices.iter().map(|s| DeviceSpec::names(s)).collect(),
    });
    Ok(PlanReport {
        arch: plan.arch.name.clone(),
        architecture: plan.arch.describe(),
        tokens: plan.arch.vit().is_some(),
        depths: plan.arch.depths(),
        widths: plan.arch.widths(),
        config_source: source.to_string(),
        dataset: info.name.clone(),
        data_note,
        input: plan.input,
        num_classes: plan.num_classes,
        k: plan.k(),
        split_source: plan.split.source.clone(),
        split_ends: plan.split.ends.clone(),
        method: plan.method,
        head: plan.head,
        schedule: cfg.pipeline.schedule,
        placement_rule: cfg.pipeline.placement,
        in_flight: cfg.pipeline.in_flight,
        compute: ComputeReport::of(cfg),
        batch_size: cfg.train.batch_size,
        lam_rule: (!plan.chains.is_empty()).then(|| lam_rule(cfg, &plan)),
        modules,
        total,
        arch_params: plan.arch.total_params(plan.input, plan.num_classes),
        placement,
        replicas,
        collectives: collectives(cfg.distributed.backend),
    })
}

/// `distributed.backend` in words, with what this machine's NCCL says.
fn collectives(backend: mlaan_core::config::Backend) -> String {
    use mlaan_core::config::Backend;
    let here = match mlaan_dist::nccl::load() {
        Ok(l) => format!("NCCL {} loads here", l.version),
        Err(e) => format!("NCCL does not load here: {e}"),
    };
    match backend {
        Backend::Gloo => "gloo (c10d, host memory)".into(),
        Backend::Nccl => format!("nccl (on the GPU, on each stage's stream; {here})"),
        Backend::Auto => format!(
            "auto: NCCL for modules on GPUs when it loads on every rank and each rank has its \
             own GPU, Gloo otherwise ({here})"
        ),
    }
}

/// The dataset as opened, or, when its files are not on this machine (planning a run for a
/// GPU server from a laptop), as its definition describes it, with a note saying so.
fn dataset_info(cfg: &RunConfig) -> Result<(mlaan_data::DatasetInfo, Option<String>)> {
    match mlaan_data::open(&cfg.data) {
        Ok(data) => Ok((data.info, None)),
        Err(e @ mlaan_data::DataError::NotFound { .. }) => {
            let info = mlaan_data::info_without_files(&cfg.data)
                .map_err(|d| anyhow::anyhow!("{e}; and without its files: {d}"))?;
            Ok((info, Some(format!("{e}: shapes and classes from the dataset's definition"))))
        }
        Err(e) => Err(anyhow::Error::new(e).context("opening the dataset")),
    }
}

/// Parameters of LAM copies live under `aux.<term>.lam.<j>.`.
fn is_lam(name: &str) -> bool {
    name.starts_with("aux.") && name.contains(".lam.")
}

/// The losses (of this or later modules) whose gradient reaches module `i`.
fn trained_by(plan: &NetworkPlan, i: usize) -> Vec<TrainedBy> {
    plan.modules
        .iter()
        .skip(i)
        .flat_map(|m| {
            m.terms
                .iter()
                .filter(move |t| t.reach >= m.index - i)
                .map(move |t| TrainedBy { module: m.index, term: t.kind })
        })
        .collect()
}

fn lam_rule(cfg: &RunConfig, plan: &NetworkPlan) -> String {
    let lam = &cfg.method.lam;
    if lam.source == "official" {
        format!(
            "the official MLAAN code's table ({} K={}, configAuxPlus_new.py)",
            plan.arch.name,
            plan.k()
        )
    } else if lam.source == "auto" && plan.arch.name == "resnet32" {
        "MLAAN table (resnet32)".into()
    } else {
        let k = plan.k();
        let depths: Vec<String> = (1..k.saturating_sub(1))
            .map(|i| pyramid_depth(lam.depth, lam.pyramid, i, k).to_string())
            .collect();
        format!(
            "pyramid rule depth_i = max(1, round(d·(1 − i·c/(K−2)) + i·c/(K−2))) with d={}, c={} \
             (before clamping: {}); every later stage's first block kept, the rest spaced evenly \
             back from the last block",
            lam.depth,
            lam.pyramid,
            if depths.is_empty() { "no steps".into() } else { depths.join(",") }
        )
    }
}

fn placement(
    cfg: &RunConfig,
    plan: &NetworkPlan,
    modules: &[ModuleReport],
    image: ImageSpec,
    cores: usize,
) -> Result<PlacementReport> {
    let specs = &cfg.pipeline.devices;
    let (devices, note) = match crate::devices::resolve(specs) {
        Ok(d) => (d, None),
        Err(e) => (
            specs
                .iter()
                .map(|d| match *d {
                    DeviceSpec::Cpu => Device::Cpu,
                    DeviceSpec::Cuda(i) => Device::Cuda(i),
                })
                .collect(),
            Some(format!(
                "{e}; the placement below is for the devices as listed, `train` would stop here"
            )),
        ),
    };
    // The measured profile runs on the devices themselves: without them, FLOPs decide.
    let mut note = note;
    let mut by_flops = cfg.clone();
    let cfg = if note.is_some() && cfg.pipeline.placement != PlacementRule::Flops {
        by_flops.pipeline.placement = PlacementRule::Flops;
        note = note.map(|n| format!("{n}; placed by FLOPs, as the profile needs the devices"));
        &by_flops
    } else {
        cfg
    };
    let (p, _) = choose_placement(cfg, plan, &devices, image, cores)?;
    let stage_device = |s: usize| specs[s.min(specs.len() - 1)];
    let stages: Vec<StageReport> = p
        .groups
        .iter()
        .enumerate()
        .map(|(s, g)| {
            let mut params = Params::default();
            for m in &modules[g.clone()] {
                params.add(&m.params);
            }
            StageReport {
                stage: s,
                device: stage_device(s).to_string(),
                modules: [g.start, g.end],
                macs_per_sample: modules[g.clone()].iter().map(|m| m.macs_per_sample).sum(),
                train_flops_per_sample: modules[g.clone()]
                    .iter()
                    .map(|m| m.flops.train_flops)
                    .sum(),
                params,
            }
        })
        .collect();
    let cpu_stages = (0..stages.len()).filter(|&s| stage_device(s) == DeviceSpec::Cpu).count();
    let intra_op_threads = match cfg.pipeline.intra_op_threads {
        0 => cpu_threads_per_stage(cores, cpu_stages),
        n => n,
    };
    Ok(PlacementReport {
        devices: specs.iter().map(|d| d.to_string()).collect(),
        rule: cfg.pipeline.placement,
        devices_available: note.is_none(),
        note,
        stages,
        cpu_stages,
        intra_op_threads,
    })
}

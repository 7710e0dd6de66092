//! `mlaan-pipe plan`: what a config would train, without training it. The split, every
//! module's blocks and losses (with how far back each gradient reaches), the LAM chains and
//! their EMA twins, exact parameter counts (every module is built on the CPU and counted),
//! activation sizes, MACs, and the placement on the devices the trainer would choose.

use crate::cli::PlanArgs;
use anyhow::{Context, Result};
use mlaan_core::arch::{BlockKind, BlockRef, Chw, Family};
use mlaan_core::config::{HeadKind, InfoProMode, Method, PlacementRule, RunConfig, Schedule};
use mlaan_core::device::{cpu_threads_per_stage, DeviceSpec};
use mlaan_core::lam::pyramid_depth;
use mlaan_core::plan::{NetworkPlan, ObjectiveSpec, TermKind};
use mlaan_engine::init::build_nets;
use mlaan_train::trainer::{choose_placement, image_spec, plan_for};
use serde::Serialize;
use std::fmt::Write as _;
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
    pub params: Params,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlacementReport {
    pub devices: Vec<String>,
    /// False when a requested GPU is not visible here (the placement is still computed).
    pub devices_available: bool,
    pub note: Option<String>,
    pub stages: Vec<StageReport>,
    pub cpu_stages: usize,
    /// Intra-op threads each CPU stage would get.
    pub intra_op_threads: usize,
}

/// Everything `plan` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub arch: String,
    pub family: Family,
    pub block: BlockKind,
    pub depths: Vec<usize>,
    pub widths: Vec<usize>,
    pub dataset: String,
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
    /// How the LAM chains were derived; `None` without MLAAN.
    pub lam_rule: Option<String>,
    pub modules: Vec<ModuleReport>,
    pub total: Params,
    /// `ArchSpec::total_params` for this input and class count (equals `total.backbone`).
    pub arch_params: usize,
    pub placement: PlacementReport,
}

pub fn run(args: PlanArgs) -> Result<()> {
    let cfg = args.config.resolve()?;
    let report = build(&cfg)?;
    match &args.json {
        Some(to) => super::emit(to, &serde_json::to_string_pretty(&report)?)?,
        None => print!("{}", render(&report, &cfg)),
    }
    if let (Some(note), Some(_)) = (&report.placement.note, &args.json) {
        eprintln!("note: {note}");
    }
    Ok(())
}

/// Derive the plan of `cfg` and measure it.
pub fn build(cfg: &RunConfig) -> Result<PlanReport> {
    let data = mlaan_data::open(&cfg.data).context("opening the dataset")?;
    let plan = plan_for(cfg, &data)?;
    let image = image_spec(&data);
    let batch = cfg.train.batch_size as u64;
    let macs = plan.module_macs();
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
            params,
            terms,
            trained_by: trained_by(&plan, m),
        });
    }
    let mut total = Params::default();
    for m in &modules {
        total.add(&m.params);
    }
    let placement = placement(cfg, &plan, &modules, image)?;
    Ok(PlanReport {
        arch: plan.arch.name.clone(),
        family: plan.arch.family,
        block: plan.arch.block,
        depths: plan.arch.depths.clone(),
        widths: plan.arch.widths.clone(),
        dataset: data.info.name.clone(),
        input: plan.input,
        num_classes: plan.num_classes,
        k: plan.k(),
        split_source: plan.split.source.clone(),
        split_ends: plan.split.ends.clone(),
        method: plan.method,
        head: cfg.method.head_kind(),
        schedule: cfg.pipeline.schedule,
        placement_rule: cfg.pipeline.placement,
        in_flight: cfg.pipeline.in_flight,
        batch_size: cfg.train.batch_size,
        lam_rule: plan.method.is_mlaan().then(|| lam_rule(cfg, &plan)),
        modules,
        total,
        arch_params: plan.arch.total_params(plan.input.c, plan.num_classes),
        placement,
    })
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
    if lam.source == "auto" && plan.arch.name == "resnet32" {
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
    image: mlaan_engine::init::ImageSpec,
) -> Result<PlacementReport> {
    let specs = &cfg.pipeline.devices;
    let (devices, note) = match mlaan_train::devices::resolve(specs) {
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
    let (p, _) = choose_placement(cfg, plan, &devices, image)?;
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
                params,
            }
        })
        .collect();
    let cpu_stages = (0..stages.len()).filter(|&s| stage_device(s) == DeviceSpec::Cpu).count();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let intra_op_threads = match cfg.pipeline.intra_op_threads {
        0 => cpu_threads_per_stage(cores, cpu_stages),
        n => n,
    };
    Ok(PlacementReport {
        devices: specs.iter().map(|d| d.to_string()).collect(),
        devices_available: note.is_none(),
        note,
        stages,
        cpu_stages,
        intra_op_threads,
    })
}

fn head_name(h: HeadKind) -> &'static str {
    match h {
        HeadKind::GapFc => "gap-fc",
        HeadKind::OneConvTwoFc => "1c2f",
        HeadKind::Dgl => "dgl",
    }
}

fn objective_text(o: &ObjectiveSpec) -> String {
    match o {
        ObjectiveSpec::Classify { head, in_channels } => {
            format!("CE({} head, {in_channels} ch)", head_name(*head))
        }
        ObjectiveSpec::InfoPro { head, in_channels, lambda1, lambda2, mode, temperature } => {
            let cls = match mode {
                InfoProMode::Softmax => "CE".to_string(),
                InfoProMode::Contrast => format!("SupCon(τ={temperature})"),
            };
            format!(
                "{lambda1:.3}·BCE(decoder) + {lambda2:.3}·{cls}({} head, {in_channels} ch)",
                head_name(*head)
            )
        }
        ObjectiveSpec::FinalClassifier => "CE(final classifier fc)".into(),
    }
}

/// `stem [1,0]..[1,2] [2,0]` style: runs of consecutive blocks of one stage shortened.
fn blocks_text(with_stem: bool, blocks: &[BlockRef]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if with_stem {
        parts.push("stem".into());
    }
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i;
        while j + 1 < blocks.len()
            && blocks[j + 1].stage == blocks[i].stage
            && blocks[j + 1].index == blocks[j].index + 1
        {
            j += 1;
        }
        parts.push(match j - i {
            0 => blocks[i].to_string(),
            1 => format!("{} {}", blocks[i], blocks[j]),
            _ => format!("{}..{}", blocks[i], blocks[j]),
        });
        i = j + 1;
    }
    parts.join(" ")
}

fn modules_text(r: std::ops::Range<usize>) -> String {
    match r.len() {
        0 => "none".into(),
        1 => r.start.to_string(),
        _ => format!("{}-{}", r.start, r.end - 1),
    }
}

fn bytes_text(b: u64) -> String {
    const KI: f64 = 1024.0;
    let b = b as f64;
    if b >= KI * KI * KI {
        format!("{:.2} GiB", b / (KI * KI * KI))
    } else if b >= KI * KI {
        format!("{:.1} MiB", b / (KI * KI))
    } else if b >= KI {
        format!("{:.1} KiB", b / KI)
    } else {
        format!("{b} B")
    }
}

fn macs_text(m: f64) -> String {
    if m >= 1e9 {
        format!("{:.2} G", m / 1e9)
    } else {
        format!("{:.2} M", m / 1e6)
    }
}

/// Thousands separators: 464154 → 464,154.
fn count_text(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn shape_text(c: Chw) -> String {
    format!("{}x{}x{}", c.c, c.h, c.w)
}

/// The human-readable report.
pub fn render(r: &PlanReport, cfg: &RunConfig) -> String {
    let mut o = String::new();
    let m = &cfg.method;
    let _ = writeln!(
        o,
        "plan: {} {} K={} on {} ({} schedule)",
        r.method, r.arch, r.k, r.dataset, r.schedule
    );
    let family = match r.family {
        Family::Cifar => "CIFAR ResNet",
        Family::ImageNet => "ImageNet ResNet",
    };
    let block = match r.block {
        BlockKind::Basic => "basic",
        BlockKind::Bottleneck => "bottleneck",
    };
    let _ = writeln!(
        o,
        "  architecture  {}: {family}, {block} blocks, stages {:?}, widths {:?}",
        r.arch, r.depths, r.widths
    );
    let _ = writeln!(
        o,
        "  input         {} ({}, after the training transform), {} classes",
        shape_text(r.input),
        r.dataset,
        r.num_classes
    );
    let ends: Vec<String> = r.split_ends.iter().map(|b| b.to_string()).collect();
    let _ = writeln!(
        o,
        "  split         K={} from {}: modules 0..K-2 end at {}",
        r.k,
        r.split_source,
        if ends.is_empty() { "(one module: the whole network)".into() } else { ends.join(" ") }
    );
    let mut method = format!("{}", r.method);
    if r.method.is_local() {
        let _ = write!(method, ": head {}", head_name(r.head));
    }
    if r.method.uses_infopro_loss() {
        let _ = write!(
            method,
            ", λ from ({}, {}) to ({}, {}), {} mode",
            m.lambda_first[0],
            m.lambda_first[1],
            m.lambda_last[0],
            m.lambda_last[1],
            match m.infopro_mode {
                InfoProMode::Softmax => "softmax",
                InfoProMode::Contrast => "contrast",
            }
        );
    }
    if r.method.is_mlaan() {
        let _ = write!(
            method,
            ", w_ind {}, w_casc {}, cascade depth d={}, EMA momentum {}",
            m.w_ind, m.w_casc, m.cascade_depth, m.ema_momentum
        );
    }
    let _ = writeln!(o, "  method        {method}");
    let _ = writeln!(
        o,
        "  schedule      {}, {} batch(es) in flight, batch size {}",
        r.schedule, r.in_flight, r.batch_size
    );
    if let Some(rule) = &r.lam_rule {
        let _ = writeln!(o, "  LAM chains    {rule}");
    }

    // Modules: blocks, sizes, parameters.
    let _ = writeln!(o);
    let blocks: Vec<String> =
        r.modules.iter().map(|md| blocks_text(md.with_stem, &md.blocks)).collect();
    let bw = blocks.iter().map(|b| b.len()).max().unwrap_or(0).max(6);
    let _ = writeln!(
        o,
        "{:>6}  {:<bw$}  {:>10}  {:>10}  {:>11}  {:>11}  {:>9}  {:>9}  {:>9}",
        "module", "blocks", "h_i", "h_i/batch", "MACs/sample", "backbone", "aux", "LAM", "EMA"
    );
    for (md, b) in r.modules.iter().zip(&blocks) {
        let _ = writeln!(
            o,
            "{:>6}  {:<bw$}  {:>10}  {:>10}  {:>11}  {:>11}  {:>9}  {:>9}  {:>9}",
            md.index,
            b,
            shape_text(md.output),
            bytes_text(md.activation_bytes),
            macs_text(md.macs_per_sample),
            count_text(md.params.backbone),
            count_text(md.params.aux),
            count_text(md.params.lam),
            count_text(md.params.ema)
        );
    }
    let total_macs: f64 = r.modules.iter().map(|m| m.macs_per_sample).sum();
    let _ = writeln!(
        o,
        "{:>6}  {:<bw$}  {:>10}  {:>10}  {:>11}  {:>11}  {:>9}  {:>9}  {:>9}",
        "total",
        "",
        "",
        "",
        macs_text(total_macs),
        count_text(r.total.backbone),
        count_text(r.total.aux),
        count_text(r.total.lam),
        count_text(r.total.ema)
    );
    let _ = writeln!(
        o,
        "  h_i/batch: float32 output of the module for a batch of {}; backbone includes the final \
         classifier; the architecture counts {} backbone parameters{}",
        r.batch_size,
        count_text(r.arch_params),
        if r.arch_params == r.total.backbone { " (equal)" } else { " (MISMATCH)" }
    );

    // Losses and gradient routes.
    let _ = writeln!(o);
    let _ = writeln!(o, "losses (reach: how many earlier modules the gradient reaches)");
    let ow = r
        .modules
        .iter()
        .flat_map(|m| m.terms.iter().map(|t| objective_text(&t.objective).chars().count()))
        .max()
        .unwrap_or(0)
        .max(9);
    let header = format!(
        "{:>6}  {:<11}  {:>6}  {:>5}  {:<8}  {:<ow$}  {}",
        "module",
        "term",
        "weight",
        "reach",
        "modules",
        "objective",
        if r.method.is_mlaan() {
            "LAM chain (EMA twin of its first block, from module)"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "{}", header.trim_end());
    for md in &r.modules {
        if md.terms.is_empty() {
            let by: Vec<String> = md
                .trained_by
                .iter()
                .map(|t| format!("{} of module {}", t.term.name(), t.module))
                .collect();
            let _ = writeln!(
                o,
                "{:>6}  (no loss of its own; trained by {})",
                md.index,
                if by.is_empty() { "nothing".into() } else { by.join(", ") }
            );
        }
        for t in &md.terms {
            let lam = match (&t.lam_chain, t.ema_source_module) {
                (Some(c), Some(src)) => {
                    let c: Vec<String> = c.iter().map(|b| b.to_string()).collect();
                    format!("{} (twin of {} from module {src})", c.join(" "), c[0])
                }
                _ => String::new(),
            };
            let reaches = modules_text(t.reaches[0]..t.reaches[t.reaches.len() - 1] + 1);
            let line = format!(
                "{:>6}  {:<11}  {:>6}  {:>5}  {:<8}  {:<ow$}  {lam}",
                md.index,
                t.kind.name(),
                format!("{}", t.weight),
                t.reach,
                reaches,
                objective_text(&t.objective)
            );
            let _ = writeln!(o, "{}", line.trim_end());
        }
        if !md.terms.is_empty() {
            let by: Vec<String> = md
                .trained_by
                .iter()
                .map(|t| format!("{} of {}", t.term.name(), t.module))
                .collect();
            let _ = writeln!(o, "{:>6}  gradients from: {}", "", by.join(", "));
        }
    }

    // Placement.
    let p = &r.placement;
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "placement on {} ({})",
        p.devices.join(","),
        if r.schedule == Schedule::Sequential {
            "the sequential schedule runs every module in one stage"
        } else if r.k <= p.devices.len() {
            "one module per device"
        } else if r.placement_rule == PlacementRule::Flops {
            "groups balanced by backbone MACs per sample"
        } else {
            "groups balanced by a measured profile of each module"
        }
    );
    if let Some(note) = &p.note {
        let _ = writeln!(o, "  note: {note}");
    }
    for s in &p.stages {
        let share = if total_macs > 0.0 { 100.0 * s.macs_per_sample / total_macs } else { 0.0 };
        let _ = writeln!(
            o,
            "  stage {:<2} {:<7} modules {:<6} {:>10} MACs/sample ({share:>5.1}%)  params {} + aux {} + LAM {} + EMA {}",
            s.stage,
            s.device,
            modules_text(s.modules[0]..s.modules[1]),
            macs_text(s.macs_per_sample),
            count_text(s.params.backbone),
            count_text(s.params.aux),
            count_text(s.params.lam),
            count_text(s.params.ema)
        );
    }
    if p.cpu_stages > 0 {
        let _ = writeln!(
            o,
            "  intra-op threads: {} per CPU stage ({} CPU stage(s), {} core(s){})",
            p.intra_op_threads,
            p.cpu_stages,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            if cfg.pipeline.intra_op_threads > 0 {
                ", set by pipeline.intra_op_threads"
            } else {
                ""
            }
        );
    }
    o
}

//! The plan report as text.

use super::PlanReport;
use mlaan_core::arch::{BlockRef, Chw};
use mlaan_core::config::{
    AugLocalCascade, HeadKind, InfoProMode, PlacementRule, RunConfig, Schedule,
};
use mlaan_core::plan::ObjectiveSpec;
use std::fmt::Write as _;

fn head_name(h: HeadKind) -> &'static str {
    h.name()
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
        ObjectiveSpec::AugLocal(net) => {
            let layers: Vec<String> = net.layers.iter().map(|b| b.to_string()).collect();
            format!(
                "CE(AugLocal net d={}: blocks like {}{}, {} ch)",
                net.depth,
                layers.join(" "),
                if net.batch_norm { " + BN" } else { "" },
                net.in_channels
            )
        }
        ObjectiveSpec::FinalClassifier => "CE(final classifier)".into(),
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
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// C×H×W of a feature map; T×D (tokens × width) of a ViT's token sequence.
fn shape_text(c: Chw, tokens: bool) -> String {
    if tokens {
        format!("{}x{}", c.h, c.c)
    } else {
        format!("{}x{}x{}", c.c, c.h, c.w)
    }
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
    let _ = writeln!(o, "  config        {}", r.config_source);
    let _ = writeln!(o, "  architecture  {}: {}", r.arch, r.architecture);
    let _ = writeln!(
        o,
        "  input         {} ({}, after the training transform), {} classes",
        shape_text(r.input, false),
        r.dataset,
        r.num_classes
    );
    if let Some(note) = &r.data_note {
        let _ = writeln!(o, "  data          {note}");
    }
    let ends: Vec<String> = r.split_ends.iter().map(|b| b.to_string()).collect();
    let _ = writeln!(
        o,
        "  split         K={} from {}: modules 0..K-2 end at {}",
        r.k,
        r.split_source,
        if ends.is_empty() { "(one module: the whole network)".into() } else { ends.join(" ") }
    );
    let mut method = format!("{}", r.method);
    if r.method.uses_auglocal_net() {
        let a = &m.auglocal;
        let _ = write!(method, ": AugLocal networks of depth {}, pyramid {}", a.depth, a.pyramid);
        if r.method.is_mlaan() {
            let _ = write!(
                method,
                ", cascade through {}",
                match a.cascade {
                    AugLocalCascade::Lam =>
                        format!("the LAM chain and a {} head", head_name(r.head)),
                    AugLocalCascade::Auxiliary => "the step's AugLocal network".into(),
                }
            );
        }
    } else if r.method.is_local() {
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
            ", w_ind {}, w_casc {}, cascade depth d={}",
            m.w_ind, m.w_casc, m.cascade_depth
        );
        if r.lam_rule.is_some() {
            let _ = write!(
                method,
                ", EMA momentum {}, EMA update {}",
                m.ema_momentum,
                m.ema_update.name()
            );
        }
        if m.cascade_depth > 2 {
            let _ = write!(
                method,
                "{}",
                if m.early_cascades {
                    ", early cascades (step 1 has a loss of reach 1)"
                } else {
                    ", no loss before step 2 (the official d=3 code)"
                }
            );
        }
    }
    let _ = writeln!(o, "  method        {method}");
    let _ = writeln!(
        o,
        "  schedule      {}, {} batch(es) in flight, batch size {}",
        r.schedule, r.in_flight, r.batch_size
    );
    let _ = writeln!(o, "  compute       {}", r.compute);
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
        "{:>6}  {:<bw$}  {:>10}  {:>10}  {:>11}  {:>13}  {:>11}  {:>9}  {:>9}  {:>9}",
        "module",
        "blocks",
        "h_i",
        "h_i/batch",
        "MACs/sample",
        "train FLOP/s.",
        "backbone",
        "aux",
        "LAM",
        "EMA"
    );
    for (md, b) in r.modules.iter().zip(&blocks) {
        let _ = writeln!(
            o,
            "{:>6}  {:<bw$}  {:>10}  {:>10}  {:>11}  {:>13}  {:>11}  {:>9}  {:>9}  {:>9}",
            md.index,
            b,
            shape_text(md.output, r.tokens),
            bytes_text(md.activation_bytes),
            macs_text(md.macs_per_sample),
            macs_text(md.flops.train_flops),
            count_text(md.params.backbone),
            count_text(md.params.aux),
            count_text(md.params.lam),
            count_text(md.params.ema)
        );
    }
    let total_macs: f64 = r.modules.iter().map(|m| m.macs_per_sample).sum();
    let total_flops: f64 = r.modules.iter().map(|m| m.flops.train_flops).sum();
    let _ = writeln!(
        o,
        "{:>6}  {:<bw$}  {:>10}  {:>10}  {:>11}  {:>13}  {:>11}  {:>9}  {:>9}  {:>9}",
        "total",
        "",
        "",
        "",
        macs_text(total_macs),
        macs_text(total_flops),
        count_text(r.total.backbone),
        count_text(r.total.aux),
        count_text(r.total.lam),
        count_text(r.total.ema)
    );
    let _ = writeln!(
        o,
        "  {}h_i/batch: float32 output of the module for a batch of {}; backbone includes the \
         final classifier; the architecture counts {} backbone parameters{}",
        if r.tokens { "h_i: tokens x width (the class token included); " } else { "" },
        r.batch_size,
        count_text(r.arch_params),
        if r.arch_params == r.total.backbone { " (equal)" } else { " (MISMATCH)" }
    );
    let _ = writeln!(
        o,
        "  MACs/sample: the backbone's forward; train FLOP/s.: a training step per sample, forward \
         and backward, loss terms (heads, decoders, LAM chains) included, counted by running them \
         (2 FLOPs per MAC, each backward pass priced as its forward)"
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
                    match t.ema_follows {
                        Some(false) => {
                            format!("{} (twin of {} frozen at initialisation)", c.join(" "), c[0])
                        }
                        _ => format!("{} (twin of {} from module {src})", c.join(" "), c[0]),
                    }
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
    if let Some(rep) = &r.replicas {
        let slices: Vec<String> =
            rep.slices.iter().enumerate().map(|(i, d)| format!("{i}: {}", d.join(","))).collect();
        let shared = rep.slices.windows(2).all(|w| w[0] == w[1]);
        let _ = writeln!(
            o,
            "replicas      {} processes per node, each a whole pipeline; local rank {}{}",
            rep.per_node,
            slices.join(" · "),
            if shared {
                " (CPU devices are shared; each process gets its share of the cores)"
            } else {
                ""
            }
        );
        let _ = writeln!(o, "              the placement below is each replica's (local rank 0's)");
    }
    let _ = writeln!(o, "replicas reduce with {}", r.collectives);
    let _ = writeln!(
        o,
        "placement on {} ({})",
        p.devices.join(","),
        if r.schedule == Schedule::Sequential {
            "the sequential schedule runs every module in one stage"
        } else if r.k <= p.devices.len() {
            "one module per device"
        } else if p.rule == PlacementRule::Flops {
            "groups balanced by counted training FLOPs per sample"
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
            "  stage {:<2} {:<7} modules {:<6} {:>10} MACs/sample ({share:>5.1}%), {} training FLOP/sample  params {} + aux {} + LAM {} + EMA {}",
            s.stage,
            s.device,
            modules_text(s.modules[0]..s.modules[1]),
            macs_text(s.macs_per_sample),
            macs_text(s.train_flops_per_sample),
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

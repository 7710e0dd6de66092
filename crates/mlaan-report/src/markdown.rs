//! The Markdown summary of a benchmark run.

use std::fmt::Write;

use mlaan_core::bench::{BenchReport, CaseResult, StageShare};
use mlaan_core::metrics::PHASES;

use crate::draw::mib;

/// What a cell shows when a number does not apply.
pub(crate) const NONE: &str = "—";

fn ratio(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => NONE.to_string(),
    }
}

fn pct(f: f64) -> String {
    if f.is_finite() {
        format!("{:.0}", f * 100.0)
    } else {
        NONE.to_string()
    }
}

fn mib_cell(bytes: u64) -> String {
    if bytes == 0 {
        NONE.to_string()
    } else {
        format!("{:.1}", mib(bytes))
    }
}

/// Text safe inside a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn throughput(c: &CaseResult) -> String {
    match c.images_per_s.len() {
        0 => NONE.to_string(),
        1 => format!("{:.1}", c.median()),
        _ => format!("{:.1} ({:.1}–{:.1})", c.median(), c.min(), c.max()),
    }
}

/// `0–3, 5, 7–8` for module indices.
fn ranges(v: &[usize]) -> String {
    if v.is_empty() {
        return NONE.to_string();
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    s.dedup();
    let mut out: Vec<String> = vec![];
    let mut start = s[0];
    let mut prev = s[0];
    for &x in &s[1..] {
        if x == prev + 1 {
            prev = x;
            continue;
        }
        out.push(span(start, prev));
        start = x;
        prev = x;
    }
    out.push(span(start, prev));
    out.join(", ")
}

fn span(a: usize, b: usize) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}–{b}")
    }
}

fn total_wait(s: &StageShare) -> f64 {
    s.wait_input + s.wait_output + s.wait_grad
}

/// Markdown for `r`: a header line with the setup, one row per case with throughput, speed-ups,
/// scaling efficiency, stage shares and memory, then a per-stage breakdown of each case and
/// how memory was measured. Ratios that do not apply (no `gpipe` case, no memory figures) are
/// shown as `—`.
pub fn bench_markdown(r: &BenchReport) -> String {
    let mut o = String::new();
    let [c, h, w] = r.input;
    let devices = if r.devices.is_empty() { NONE.to_string() } else { r.devices.join(", ") };
    let _ = writeln!(o, "## Benchmark: {} on {}\n", r.arch, r.dataset);
    let _ = writeln!(
        o,
        "{} · {} · input {c}×{h}×{w} · batch {} · K = {} · devices: {} · {} warm-up + {} timed steps · {} repeat{}\n",
        r.arch,
        r.dataset,
        r.batch_size,
        r.k,
        devices,
        r.warmup_steps,
        r.timed_steps,
        r.repeats,
        if r.repeats == 1 { "" } else { "s" },
    );

    if r.cases.is_empty() {
        o.push_str("No cases were run.\n");
    } else {
        o.push_str(
            "| case | devices | images/s median (min–max) | × e2e | × gpipe | scaling eff. \
             | busy % per stage | wait in/out/grad % (largest stage) | max stage peak MiB \
             | × e2e memory | allocator peak MiB |\n",
        );
        o.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for case in &r.cases {
            let busy = if case.stages.is_empty() {
                NONE.to_string()
            } else {
                case.stages.iter().map(|s| pct(s.busy)).collect::<Vec<_>>().join("/")
            };
            let wait = case
                .stages
                .iter()
                .max_by(|a, b| total_wait(a).total_cmp(&total_wait(b)))
                .map(|s| {
                    format!(
                        "{}/{}/{} (s{})",
                        pct(s.wait_input),
                        pct(s.wait_output),
                        pct(s.wait_grad),
                        s.stage
                    )
                })
                .unwrap_or_else(|| NONE.to_string());
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(&case.name),
                case.devices_used(),
                throughput(case),
                ratio(r.speedup(case, "e2e")),
                ratio(r.speedup(case, "gpipe")),
                ratio(r.scaling_efficiency(case)),
                busy,
                wait,
                mib_cell(case.max_stage_bytes()),
                ratio(r.memory_ratio(case).filter(|_| case.max_stage_bytes() > 0)),
                mib_cell(case.max_allocator_bytes()),
            );
        }
        o.push('\n');
        o.push_str(
            "× e2e, × gpipe: median throughput relative to that baseline's median; scaling eff.: \
             × e2e per device used; × e2e memory: largest stage peak relative to e2e's; \
             allocator peak: the caching allocator's peak allocated bytes on the busiest CUDA \
             device (all its stages together); shares are fractions of each stage's wall time \
             in the median repetition.\n\n",
        );

        let replicated: Vec<&CaseResult> = r.cases.iter().filter(|c| c.replicas > 1).collect();
        if !replicated.is_empty() {
            o.push_str("### Data-parallel replicas\n\n");
            o.push_str(
                "| case | replicas | global batch | reduced with | all-reduced MiB per step, per \
                 stage | all-reduce % of wall, per stage |\n|---|--:|--:|---|--:|--:|\n",
            );
            for case in replicated {
                let per_stage = |f: &dyn Fn(&StageShare) -> String| {
                    case.stages.iter().map(f).collect::<Vec<_>>().join(" / ")
                };
                let reducers = if case.reducers.is_empty() {
                    "gloo".to_string()
                } else {
                    let mut names = case.reducers.clone();
                    names.dedup();
                    names.join(", ")
                };
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} |",
                    cell(&case.name),
                    case.replicas,
                    case.replicas * r.batch_size,
                    reducers,
                    per_stage(&|s| format!(
                        "{:.2}",
                        s.allreduce_bytes_per_step / (1u64 << 20) as f64
                    )),
                    per_stage(&|s| pct(s.allreduce)),
                );
            }
            o.push_str(
                "\nImages/s of a replicated case are all replicas' together; bytes are what one \
                 rank puts into its all-reduces (a ring moves about twice that per rank). Gloo \
                 reduces on the host, so its share is the time it took; NCCL queues on the \
                 stage's stream, so its share is the host's time to queue it (the device's \
                 bandwidth is `cargo bench --bench allreduce`'s, NCCL beside Gloo through host \
                 memory).\n\n",
            );
        }

        if r.cases.iter().any(|c| c.stages.iter().any(|s| !s.phases.is_empty())) {
            o.push_str("### Where the time goes\n\n");
            o.push_str(
                "| case | stage | GFLOP/s | forward | loss terms | backward to input | backward to \
                 parameters | optimizer | EMA | all-reduce | other busy | waiting |\n\
                 |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
            );
            for case in &r.cases {
                for s in &case.stages {
                    let share = |p: &str| s.phases.get(p).copied().unwrap_or(0.0);
                    let named: f64 = PHASES.iter().map(|p| share(p)).sum::<f64>() + s.allreduce;
                    let cells: Vec<String> = PHASES.iter().map(|p| pct(share(p))).collect();
                    let _ = writeln!(
                        o,
                        "| {} | {} | {:.1} | {} | {} | {} | {} |",
                        cell(&case.name),
                        s.stage,
                        s.gflop_per_s,
                        cells.join(" | "),
                        pct(s.allreduce),
                        pct((s.busy - named).max(0.0)),
                        pct(total_wait(s)),
                    );
                }
            }
            o.push_str(
                "\nGFLOP/s: the stage's training FLOPs per sample (as `plan` counts them) times the \
                 case's images/s per replica. The other columns: percent of each stage's wall time \
                 in the median repetition. Loss terms include \
                 heads, decoders and LAM chains, forward and backward. A module whose every \
                 gradient travels on gets its parameter gradients in the same pass as its input \
                 gradient, counted under backward to input. Other busy is the stage's own work \
                 between them (messages, memory accounting, bookkeeping). On CUDA these are host \
                 times.\n\n",
            );
        }

        o.push_str("### Stages\n\n");
        for case in &r.cases {
            let _ = write!(o, "**{}**", cell(&case.name));
            let mut meta = vec![];
            if !case.method.is_empty() {
                meta.push(format!("method {}", case.method));
            }
            if !case.schedule.is_empty() {
                meta.push(format!("schedule {}", case.schedule));
            }
            if case.k > 0 {
                meta.push(format!("K = {}", case.k));
            }
            if case.micro_batches > 0 {
                let s = if case.micro_batches == 1 { "" } else { "es" };
                meta.push(format!("{} micro-batch{s}", case.micro_batches));
            }
            if !case.devices.is_empty() {
                meta.push(case.devices.join(", "));
            }
            if !meta.is_empty() {
                let _ = write!(o, " ({})", cell(&meta.join(", ")));
            }
            o.push_str("\n\n");
            if case.stages.is_empty() {
                o.push_str("No stage figures.\n\n");
            } else {
                o.push_str(
                    "| stage | device | modules | busy % | wait input % | wait output % \
                     | wait grad % | peak live MiB |\n",
                );
                o.push_str("|--:|---|---|--:|--:|--:|--:|--:|\n");
                for s in &case.stages {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | {} | {} | {} | {} |",
                        s.stage,
                        cell(&s.device),
                        ranges(&s.modules),
                        pct(s.busy),
                        pct(s.wait_input),
                        pct(s.wait_output),
                        pct(s.wait_grad),
                        mib_cell(s.peak_live_bytes),
                    );
                }
                o.push('\n');
            }
            if !case.gpu_peak_bytes.is_empty() {
                // One peak per distinct GPU, in first-use order.
                let mut gpus: Vec<&String> = Vec::new();
                for d in case.devices.iter().filter(|d| *d != "cpu") {
                    if !gpus.contains(&d) {
                        gpus.push(d);
                    }
                }
                let peaks: Vec<String> = case
                    .gpu_peak_bytes
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        let dev = gpus.get(i).map_or_else(|| format!("#{i}"), |d| d.to_string());
                        format!("{dev} {:.1} MiB", mib(b))
                    })
                    .collect();
                let _ = writeln!(o, "GPU peak: {}\n", cell(&peaks.join(", ")));
            }
            if !case.allocator.is_empty() {
                let peaks: Vec<String> = case
                    .allocator
                    .iter()
                    .map(|a| {
                        let (al, re) = (mib(a.peak_allocated_bytes), mib(a.peak_reserved_bytes));
                        format!("{} {al:.1} / {re:.1} MiB", a.device)
                    })
                    .collect();
                let _ = writeln!(
                    o,
                    "Allocator peak (allocated / reserved): {}\n",
                    cell(&peaks.join(", "))
                );
            }
        }
    }

    let note = if r.memory_note.trim().is_empty() { NONE } else { r.memory_note.trim() };
    let _ = writeln!(o, "Memory: {note}\n");
    match r.peak_rss_bytes {
        Some(b) => {
            let _ = writeln!(o, "Peak RSS: {:.1} MiB", mib(b));
        }
        None => o.push_str("Peak RSS: not measured\n"),
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_ranges() {
        assert_eq!(ranges(&[]), "—");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[0, 1, 2, 3, 5, 7, 8]), "0–3, 5, 7–8");
    }
}

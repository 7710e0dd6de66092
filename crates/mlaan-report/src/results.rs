//! The method comparison table: one row per method and variant, the test accuracy of each
//! seed, its mean and spread, how much of the gap between a base method and e2e its MLAAN
//! variant closes, and what each variant (a schedule, an option) changes against its method's
//! reference row.

use std::collections::BTreeMap;
use std::fmt::Write;

/// What one finished run reports (from its `summary.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub method: String,
    /// What sets the run apart from its method's defaults (e.g. `d=3`), shown after the name;
    /// runs with different variants are separate rows.
    pub variant: Option<String>,
    pub arch: String,
    pub k: usize,
    pub seed: u64,
    pub epochs: usize,
    pub test_accuracy: f64,
    pub module_accuracy: Vec<Option<f64>>,
    pub images_per_s: f64,
    pub run: String,
}

/// Methods in the order the table shows them.
const ORDER: [&str; 7] =
    ["e2e", "dgl", "mlaan-dgl", "infopro", "mlaan-infopro", "auglocal", "mlaan-auglocal"];

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// One table row's accuracy over its seeds, for the gap analysis.
struct RowMean<'a> {
    /// The row's label (method and variant).
    label: String,
    method: &'a str,
    variant: Option<&'a str>,
    k: usize,
    mean: f64,
    /// max − min over seeds; `None` with one seed.
    spread: Option<f64>,
}

/// Runs grouped into table rows: keyed by (method rank, K, variant), holding the row's label
/// and its runs (one per seed).
type Groups<'a> = BTreeMap<(usize, usize, Option<&'a str>), (String, Vec<&'a ResultRow>)>;

/// Markdown: a title (a heading of `level`, 1 for a page of its own), the command that made
/// it, the table, the gap analysis and the variants against their reference rows.
pub fn results_markdown(title: &str, level: usize, command: &str, rows: &[ResultRow]) -> String {
    let mut by: Groups = BTreeMap::new();
    for r in rows {
        let rank = ORDER.iter().position(|m| *m == r.method).unwrap_or(ORDER.len());
        let label = match &r.variant {
            Some(v) => format!("{} ({v})", r.method),
            None => r.method.clone(),
        };
        by.entry((rank, r.k, r.variant.as_deref())).or_insert((label, Vec::new())).1.push(r);
    }
    let mut o = String::new();
    let _ = writeln!(o, "{} {title}\n", "#".repeat(level.max(1)));
    let _ = writeln!(o, "Made by `{command}` from the runs' `summary.json` files.\n");
    let _ = writeln!(
        o,
        "| method | K | epochs | test accuracy per seed | mean | spread | images/s | per-module head accuracy (first seed) |"
    );
    let _ = writeln!(o, "|---|--:|--:|---|--:|--:|--:|---|");
    // Mean and, with two seeds or more, spread.
    let mut means: Vec<RowMean> = Vec::new();
    for (method, runs) in by.values() {
        let mut runs = runs.clone();
        runs.sort_by_key(|r| r.seed);
        let acc: Vec<f64> = runs.iter().map(|r| r.test_accuracy).collect();
        let spread = (acc.len() > 1).then(|| {
            100.0
                * (acc.iter().copied().fold(f64::MIN, f64::max)
                    - acc.iter().copied().fold(f64::MAX, f64::min))
        });
        let spread_cell = spread.map_or("— (1 seed)".to_string(), |s| format!("{s:.2}"));
        let modules = runs[0]
            .module_accuracy
            .iter()
            .map(|a| a.map_or("—".into(), |a| format!("{:.1}", 100.0 * a)))
            .collect::<Vec<_>>()
            .join(" / ");
        let _ = writeln!(
            o,
            "| {method} | {} | {} | {} | **{:.2}** | {spread_cell} | {:.0} | {modules} |",
            runs[0].k,
            runs[0].epochs,
            runs.iter()
                .map(|r| format!("{:.2} (seed {})", 100.0 * r.test_accuracy, r.seed))
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * mean(&acc),
            mean(&runs.iter().map(|r| r.images_per_s).collect::<Vec<_>>()),
        );
        means.push(RowMean {
            label: method.clone(),
            method: &runs[0].method,
            variant: runs[0].variant.as_deref(),
            k: runs[0].k,
            mean: 100.0 * mean(&acc),
            spread,
        });
    }
    let _ = writeln!(o, "\nAccuracies in %; spread = max − min over seeds; a module without a classifying head shows —.");
    let _ = writeln!(
        o,
        "images/s is each run's own training throughput, measured while it may have shared the \
         cores with other runs: read it as a record of the run, not as a speed comparison."
    );
    if means.iter().any(|m| m.method.starts_with("mlaan-")) {
        let _ = writeln!(
            o,
            "A MLAAN module's head accuracy is that of its independent head, whose loss weight \
             w_ind = 0.001 lets it learn little; the module learns through its cascade loss."
        );
    }
    let _ = writeln!(o);
    // Name the K in the comparisons only when the local rows have more than one.
    let ks: std::collections::BTreeSet<usize> =
        means.iter().filter(|m| m.method != "e2e").map(|m| m.k).collect();
    let several_k = ks.len() > 1;
    let at = |k: usize| if several_k { format!(" at K={k}") } else { String::new() };
    // Gap analysis against the reference rows (no variant) of e2e and of the base method at
    // the same K.
    let reference = |method: &str, k: Option<usize>| {
        means
            .iter()
            .find(|m| m.method == method && m.variant.is_none() && k.is_none_or(|k| m.k == k))
    };
    if let Some(e2e) = reference("e2e", None) {
        for base in ["dgl", "infopro", "auglocal"] {
            let mlaan = format!("mlaan-{base}");
            for m in means.iter().filter(|r| r.method == mlaan) {
                let Some(b) = reference(base, Some(m.k)) else { continue };
                let gap = e2e.mean - b.mean;
                // The share of the gap closed means something only where the base trails e2e.
                let closed = if gap <= 1e-9 {
                    format!("{base} is {:.2} points above e2e here: no gap to close", -gap)
                } else if m.mean < b.mean {
                    format!("it widens {base}'s gap of {gap:.2} points to e2e")
                } else {
                    let share = 100.0 * (m.mean - b.mean) / gap;
                    format!("it closes {share:.0}% of {base}'s gap of {gap:.2} points to e2e")
                };
                let _ = writeln!(
                    o,
                    "- {}{} vs {base}: {:+.2} points ({}); {closed}.",
                    m.label,
                    at(m.k),
                    m.mean - b.mean,
                    against_spread(b, m),
                );
            }
        }
    }
    // Each variant against its method's reference row at the same K.
    for v in means.iter().filter(|m| m.variant.is_some()) {
        let Some(r) = reference(v.method, Some(v.k)) else { continue };
        let _ = writeln!(
            o,
            "- {}{} vs {}: {:+.2} points ({}).",
            v.label,
            at(v.k),
            r.label,
            v.mean - r.mean,
            against_spread(r, v),
        );
    }
    o
}

/// Whether the difference of two rows' means exceeds the larger of their seed spreads
/// ("clearly different"), said in words.
fn against_spread(base: &RowMean, other: &RowMean) -> String {
    match (base.spread, other.spread) {
        (Some(bs), Some(os)) => {
            let verdict =
                if (other.mean - base.mean).abs() > bs.max(os) { "more" } else { "not more" };
            format!("seed spreads {bs:.2} and {os:.2}: {verdict} than the spread")
        }
        _ => "one seed: no spread measured".to_string(),
    }
}

/// `page` with the text between `<!-- name -->` and `<!-- /name -->` replaced by `body`, or
/// with the section appended when the page has none. A page with one marker and not the other
/// is an error (the section's end cannot be known).
pub fn replace_section(page: &str, name: &str, body: &str) -> Result<String, String> {
    let (open, close) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->"));
    let section = format!("{open}\n{}\n{close}", body.trim_end());
    match (page.find(&open), page.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            Ok(format!("{}{section}{}", &page[..a], &page[b + close.len()..]))
        }
        (None, None) if page.trim().is_empty() => Ok(format!("{section}\n")),
        (None, None) => Ok(format!("{}\n\n{section}\n", page.trim_end())),
        _ => Err(format!("the page has a broken `{open}` … `{close}` pair")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, k: usize, seed: u64, acc: f64) -> ResultRow {
        ResultRow {
            method: method.into(),
            variant: None,
            arch: "resnet32".into(),
            k,
            seed,
            epochs: 1,
            test_accuracy: acc,
            module_accuracy: vec![None, Some(0.5)],
            images_per_s: 100.0,
            run: format!("{method}-{seed}"),
        }
    }

    #[test]
    fn table_and_gap() {
        let rows = [
            row("mlaan-dgl", 8, 0, 0.88),
            row("e2e", 1, 0, 0.90),
            row("dgl", 8, 0, 0.80),
            row("dgl", 8, 1, 0.82),
        ];
        let md = results_markdown("T", 1, "cmd", &rows);
        let e2e = md.find("| e2e |").unwrap();
        let dgl = md.find("| dgl |").unwrap();
        assert!(e2e < dgl, "{md}");
        assert!(md.contains("**81.00** | 2.00"), "{md}");
        // (88 − 81) / (90 − 81) = 78%.
        assert!(md.contains("mlaan-dgl vs dgl: +7.00 points") && md.contains("closes 78%"), "{md}");
        assert!(md.contains("— / 50.0"), "{md}");
        // One seed has no spread to show.
        assert!(md.contains("**88.00** | — (1 seed)"), "{md}");
        assert!(md.contains("one seed: no spread measured"), "{md}");
        // A base above e2e has no gap to close.
        let above = [row("mlaan-dgl", 8, 0, 0.80), row("e2e", 1, 0, 0.80), row("dgl", 8, 0, 0.81)];
        let md = results_markdown("T", 1, "cmd", &above);
        assert!(md.contains("dgl is 1.00 points above e2e here: no gap to close"), "{md}");
        assert!(!md.contains("closes"), "{md}");
        // A MLAAN row below its base widens the gap rather than closing a negative share.
        let below = [row("mlaan-dgl", 8, 0, 0.80), row("e2e", 1, 0, 0.90), row("dgl", 8, 0, 0.82)];
        let md = results_markdown("T", 1, "cmd", &below);
        assert!(md.contains("it widens dgl's gap of 8.00 points to e2e"), "{md}");
    }

    #[test]
    fn gap_verdict_compares_difference_with_spread() {
        let base = [row("e2e", 1, 0, 0.90), row("dgl", 8, 0, 0.80), row("dgl", 8, 1, 0.82)];
        let clear = [row("mlaan-dgl", 8, 0, 0.86), row("mlaan-dgl", 8, 1, 0.87)];
        let md = results_markdown("T", 1, "cmd", &[&base[..], &clear[..]].concat());
        assert!(md.contains("seed spreads 2.00 and 1.00: more than the spread"), "{md}");
        let overlap = [row("mlaan-dgl", 8, 0, 0.81), row("mlaan-dgl", 8, 1, 0.84)];
        let md = results_markdown("T", 1, "cmd", &[&base[..], &overlap[..]].concat());
        assert!(md.contains("seed spreads 2.00 and 3.00: not more than the spread"), "{md}");
    }

    #[test]
    fn variants_are_rows_of_their_own_after_the_default() {
        let mut d3 = row("mlaan-dgl", 8, 0, 0.89);
        d3.variant = Some("d=3".into());
        let rows =
            [d3, row("mlaan-dgl", 8, 0, 0.88), row("e2e", 1, 0, 0.90), row("dgl", 8, 0, 0.80)];
        let md = results_markdown("T", 1, "cmd", &rows);
        let plain = md.find("| mlaan-dgl | 8").unwrap();
        let variant = md.find("| mlaan-dgl (d=3) | 8").unwrap();
        assert!(plain < variant, "{md}");
        assert!(md.contains("- mlaan-dgl vs dgl: +8.00"), "{md}");
        assert!(md.contains("- mlaan-dgl (d=3) vs dgl: +9.00"), "{md}");
    }

    #[test]
    fn variants_are_compared_with_their_reference_row_at_the_same_k() {
        let mut rows = vec![row("e2e", 1, 0, 0.90), row("e2e", 1, 1, 0.90)];
        for (k, base, mlaan) in [(8, 0.80, 0.88), (15, 0.70, 0.86)] {
            for seed in 0..2 {
                let off = 0.01 * seed as f64;
                rows.push(row("dgl", k, seed, base + off));
                rows.push(row("mlaan-dgl", k, seed, mlaan + off));
            }
        }
        for (seed, acc) in [(0, 0.875), (1, 0.895)] {
            let mut r = row("mlaan-dgl", 8, seed, acc);
            r.variant = Some("async, 2 stages".into());
            rows.push(r);
        }
        let md = results_markdown("T", 2, "cmd", &rows);
        assert!(md.starts_with("## T"), "{md}");
        // Each MLAAN row against dgl at its own K.
        assert!(md.contains("- mlaan-dgl at K=8 vs dgl: +8.00 points"), "{md}");
        assert!(md.contains("- mlaan-dgl at K=15 vs dgl: +16.00 points"), "{md}");
        // The variant against mlaan-dgl at K=8 (88.5 ± 1), not at K=15.
        assert!(
            md.contains("- mlaan-dgl (async, 2 stages) at K=8 vs mlaan-dgl: +0.00 points (seed spreads 1.00 and 2.00: not more than the spread)."),
            "{md}"
        );
    }

    #[test]
    fn a_section_replaces_its_own_text_and_keeps_the_rest() {
        let first = replace_section("", "ablation", "## A\nold").unwrap();
        assert_eq!(first, "<!-- ablation -->\n## A\nold\n<!-- /ablation -->\n");
        let page = format!("# Page\n\n{first}\nafter\n");
        let again = replace_section(&page, "ablation", "## A\nnew\n").unwrap();
        assert_eq!(again, "# Page\n\n<!-- ablation -->\n## A\nnew\n<!-- /ablation -->\n\nafter\n");
        let other = replace_section(&again, "methods", "## M").unwrap();
        assert!(other.starts_with(&again.trim_end().to_string()), "{other}");
        assert!(other.ends_with("<!-- methods -->\n## M\n<!-- /methods -->\n"), "{other}");
        assert!(replace_section("<!-- ablation -->\nno end", "ablation", "x").is_err());
    }
}

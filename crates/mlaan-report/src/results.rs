//! The method comparison table: one row per method, the test accuracy of each seed, its mean
//! and spread, and how much of the gap between a base method and e2e its MLAAN variant closes.

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
const ORDER: [&str; 5] = ["e2e", "dgl", "mlaan-dgl", "infopro", "mlaan-infopro"];

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// One table row's accuracy over its seeds, for the gap analysis.
struct RowMean<'a> {
    /// The row's label (method and variant).
    label: String,
    method: &'a str,
    mean: f64,
    /// max − min over seeds; `None` with one seed.
    spread: Option<f64>,
}

/// Runs grouped into table rows: keyed by (method rank, K, variant), holding the row's label
/// and its runs (one per seed).
type Groups<'a> = BTreeMap<(usize, usize, Option<&'a str>), (String, Vec<&'a ResultRow>)>;

/// Markdown: a title, the command that made it, the table and the gap analysis.
pub fn results_markdown(title: &str, command: &str, rows: &[ResultRow]) -> String {
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
    let _ = writeln!(o, "# {title}\n");
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
    // Gap analysis against the default-variant rows of e2e and the base method.
    let plain = |name: &str| means.iter().find(|m| m.label == name).map(|m| (m.mean, m.spread));
    if let Some((e2e, _)) = plain("e2e") {
        for base in ["dgl", "infopro"] {
            let Some((b, bs)) = plain(base) else { continue };
            let mlaan = format!("mlaan-{base}");
            for RowMean { label: ml, mean: m, spread: ms, .. } in
                means.iter().filter(|r| r.method == mlaan)
            {
                let (m, ms) = (*m, *ms);
                let gap = e2e - b;
                let closed = if gap.abs() > 1e-9 { 100.0 * (m - b) / gap } else { f64::NAN };
                // "Clearly better" = the difference of the means exceeds the larger spread.
                let spreads = match (bs, ms) {
                    (Some(bs), Some(ms)) => {
                        let verdict = if m - b > bs.max(ms) { "more" } else { "not more" };
                        format!("seed spreads {bs:.2} and {ms:.2}: {verdict} than the spread")
                    }
                    _ => "one seed: no spread measured".to_string(),
                };
                let _ = writeln!(
                    o,
                    "- {ml} vs {base}: {:+.2} points ({spreads}); it closes {closed:.0}% of {base}'s gap of {gap:.2} points to e2e.",
                    m - b
                );
            }
        }
    }
    o
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
        let md = results_markdown("T", "cmd", &rows);
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
    }

    #[test]
    fn gap_verdict_compares_difference_with_spread() {
        let base = [row("e2e", 1, 0, 0.90), row("dgl", 8, 0, 0.80), row("dgl", 8, 1, 0.82)];
        let clear = [row("mlaan-dgl", 8, 0, 0.86), row("mlaan-dgl", 8, 1, 0.87)];
        let md = results_markdown("T", "cmd", &[&base[..], &clear[..]].concat());
        assert!(md.contains("seed spreads 2.00 and 1.00: more than the spread"), "{md}");
        let overlap = [row("mlaan-dgl", 8, 0, 0.81), row("mlaan-dgl", 8, 1, 0.84)];
        let md = results_markdown("T", "cmd", &[&base[..], &overlap[..]].concat());
        assert!(md.contains("seed spreads 2.00 and 3.00: not more than the spread"), "{md}");
    }

    #[test]
    fn variants_are_rows_of_their_own_after_the_default() {
        let mut d3 = row("mlaan-dgl", 8, 0, 0.89);
        d3.variant = Some("d=3".into());
        let rows =
            [d3, row("mlaan-dgl", 8, 0, 0.88), row("e2e", 1, 0, 0.90), row("dgl", 8, 0, 0.80)];
        let md = results_markdown("T", "cmd", &rows);
        let plain = md.find("| mlaan-dgl | 8").unwrap();
        let variant = md.find("| mlaan-dgl (d=3) | 8").unwrap();
        assert!(plain < variant, "{md}");
        assert!(md.contains("- mlaan-dgl vs dgl: +8.00"), "{md}");
        assert!(md.contains("- mlaan-dgl (d=3) vs dgl: +9.00"), "{md}");
    }
}

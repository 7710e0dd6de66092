//! `verify`: opens a dataset and reads every sample of both splits once (on worker threads),
//! reporting counts, shapes, the label histogram and every unreadable sample with its reason.

use crate::{open, DataError, Dataset, ImageShape};
use mlaan_core::config::DataConfig;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// What `verify` found in one split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitReport {
    pub name: String,
    pub describe: String,
    pub count: usize,
    pub num_classes: usize,
    /// Decoded image shapes and how many samples have each.
    pub shapes: BTreeMap<ImageShape, usize>,
    /// Samples per label, indexed by label (labels past `num_classes` widen it).
    pub label_histogram: Vec<usize>,
    pub label_range: Option<(u32, u32)>,
    /// `(sample index, reason)` of every sample that could not be read.
    pub bad: Vec<(usize, String)>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub dataset: String,
    pub splits: Vec<SplitReport>,
}

impl VerifyReport {
    /// True when every sample was readable and every label below the class count.
    pub fn is_ok(&self) -> bool {
        self.splits.iter().all(|s| {
            s.bad.is_empty() && s.label_range.is_none_or(|(_, hi)| (hi as usize) < s.num_classes)
        })
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "dataset {}: {}",
            self.dataset,
            if self.is_ok() { "OK" } else { "PROBLEMS FOUND" }
        )?;
        for s in &self.splits {
            writeln!(f, "{}: {}", s.name, s.describe)?;
            writeln!(
                f,
                "  samples: {} read in {:.1} s, {} unreadable",
                s.count,
                s.seconds,
                s.bad.len()
            )?;
            let shapes: Vec<String> = s.shapes.iter().map(|(k, v)| format!("{k} x{v}")).collect();
            let shown = shapes.len().min(8);
            writeln!(
                f,
                "  shapes: {}{}",
                shapes[..shown].join(", "),
                if shapes.len() > shown {
                    format!(" (+{} more)", shapes.len() - shown)
                } else {
                    String::new()
                }
            )?;
            match s.label_range {
                Some((lo, hi)) => writeln!(f, "  labels: {lo}..={hi} ({} classes)", s.num_classes)?,
                None => writeln!(f, "  labels: none")?,
            }
            let hist: Vec<String> =
                s.label_histogram.iter().enumerate().map(|(l, n)| format!("{l}:{n}")).collect();
            writeln!(f, "  histogram: {}", hist.join(" "))?;
            for (i, reason) in s.bad.iter().take(20) {
                writeln!(f, "  bad sample {i}: {reason}")?;
            }
            if s.bad.len() > 20 {
                writeln!(f, "  ... and {} more bad samples", s.bad.len() - 20)?;
            }
        }
        Ok(())
    }
}

/// Reads every sample of both splits of the dataset `cfg` names (limits applied).
pub fn verify(cfg: &DataConfig) -> Result<VerifyReport, DataError> {
    let ds = open(cfg)?;
    let workers = match cfg.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    Ok(VerifyReport {
        dataset: ds.info.name.clone(),
        splits: vec![
            verify_split("train", ds.train.as_ref(), workers),
            verify_split("test", ds.test.as_ref(), workers),
        ],
    })
}

/// Checks one split with `workers` threads pulling sample indices from a shared counter.
pub fn verify_split(name: &str, ds: &dyn Dataset, workers: usize) -> SplitReport {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let shared = Mutex::new((BTreeMap::<ImageShape, usize>::new(), Vec::<(usize, String)>::new()));
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| {
                let mut shapes = BTreeMap::new();
                let mut bad = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ds.len() {
                        break;
                    }
                    // A panic inside a decoder is this sample's problem, not the report's.
                    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ds.get(i)))
                        .unwrap_or_else(|_| {
                            Err(crate::DataError::Loader("panicked while reading".into()))
                        });
                    match got {
                        Ok(s) if s.label != ds.label(i) => bad.push((
                            i,
                            format!(
                                "label {} from get() but {} from label()",
                                s.label,
                                ds.label(i)
                            ),
                        )),
                        Ok(s) => *shapes.entry(s.shape).or_insert(0) += 1,
                        Err(e) => bad.push((i, e.to_string())),
                    }
                }
                if let Ok(mut g) = shared.lock() {
                    for (k, v) in shapes {
                        *g.0.entry(k).or_insert(0) += v;
                    }
                    g.1.extend(bad);
                }
            });
        }
    });
    let (shapes, mut bad) = shared.into_inner().unwrap_or_default();
    bad.sort_by_key(|b| b.0);
    let mut hist = vec![0usize; ds.num_classes()];
    let mut range: Option<(u32, u32)> = None;
    for i in 0..ds.len() {
        let l = ds.label(i);
        if l == u32::MAX {
            continue;
        }
        // Out-of-range labels widen the histogram (bounded, so a corrupt label cannot make it
        // allocate gigabytes); `label_range` records them regardless.
        if l as usize >= hist.len() && l < 1 << 16 {
            hist.resize(l as usize + 1, 0);
        }
        if let Some(h) = hist.get_mut(l as usize) {
            *h += 1;
        }
        range = Some(range.map_or((l, l), |(lo, hi)| (lo.min(l), hi.max(l))));
    }
    SplitReport {
        name: name.into(),
        describe: ds.describe(),
        count: ds.len(),
        num_classes: ds.num_classes(),
        shapes,
        label_histogram: hist,
        label_range: range,
        bad,
        seconds: start.elapsed().as_secs_f64(),
    }
}

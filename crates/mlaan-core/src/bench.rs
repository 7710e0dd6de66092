//! Benchmark results: what `mlaan-pipe bench` measures and writes as `bench.json`, and what
//! the report renders (Markdown table, plots). No libtorch here, so reports can be rendered
//! and tested anywhere.

use serde::{Deserialize, Serialize};

/// Time shares of one stage over the timed window (fractions of its wall time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageShare {
    pub stage: usize,
    pub device: String,
    pub modules: Vec<usize>,
    pub busy: f64,
    pub wait_input: f64,
    pub wait_output: f64,
    pub wait_grad: f64,
    /// Exact peak of live tensor bytes the stage held (parameters, aux, LAM, EMA, optimizer
    /// state, gradients, inputs and graphs in flight).
    pub peak_live_bytes: u64,
    /// With replicas: the share of wall time spent averaging gradients (inside `busy`).
    #[serde(default)]
    pub allreduce: f64,
    /// With replicas: bytes this stage all-reduced per step (each rank's buffers).
    #[serde(default)]
    pub allreduce_bytes_per_step: f64,
    /// Training arithmetic achieved: the stage's FLOPs per sample (counted, see `plan`) times
    /// the case's images/s per replica, in GFLOP/s.
    #[serde(default)]
    pub gflop_per_s: f64,
    /// Shares of wall time by compute phase (inside `busy`; see `StageWindow::phases_ms`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub phases: std::collections::BTreeMap<String, f64>,
}

fn one() -> usize {
    1
}

/// One benchmarked configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// e.g. `e2e`, `gpipe`, `mlaan-dgl async`.
    pub name: String,
    pub method: String,
    pub schedule: String,
    pub devices: Vec<String>,
    pub k: usize,
    pub micro_batches: usize,
    /// Data-parallel replicas (processes) of the case; throughput is theirs together.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Images per second of each repetition (device-synchronised: the pipeline is drained).
    pub images_per_s: Vec<f64>,
    /// Shares of the median repetition.
    pub stages: Vec<StageShare>,
    /// Peak GPU memory per device of the median repetition, where NVML is available.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_peak_bytes: Vec<u64>,
    /// The caching allocator's peaks per CUDA device of the median repetition, reset when
    /// the case started (empty on CPU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocator: Vec<AllocatorPeak>,
    /// With replicas: the library that reduced each module's gradients (`nccl`, `gloo`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reducers: Vec<String>,
}

/// The caching allocator's peak bytes on one CUDA device: what `torch.cuda.
/// max_memory_allocated` (held by tensors) and `max_memory_reserved` (held from the driver,
/// cache included) report, and what the local-learning papers quote as a method's memory.
/// Every stage on the device counts in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorPeak {
    pub device: String,
    pub peak_allocated_bytes: u64,
    pub peak_reserved_bytes: u64,
}

impl CaseResult {
    pub fn median(&self) -> f64 {
        median(&self.images_per_s)
    }
    pub fn min(&self) -> f64 {
        self.images_per_s.iter().copied().fold(f64::INFINITY, f64::min)
    }
    pub fn max(&self) -> f64 {
        self.images_per_s.iter().copied().fold(0.0, f64::max)
    }
    /// Devices over all replicas (a CPU device counts once per process that uses it).
    pub fn devices_used(&self) -> usize {
        self.devices.len().max(1) * self.replicas.max(1)
    }
    /// Largest per-stage peak of live bytes.
    pub fn max_stage_bytes(&self) -> u64 {
        self.stages.iter().map(|s| s.peak_live_bytes).max().unwrap_or(0)
    }
    /// Largest allocator peak (allocated) over the case's CUDA devices; 0 on CPU.
    pub fn max_allocator_bytes(&self) -> u64 {
        self.allocator.iter().map(|a| a.peak_allocated_bytes).max().unwrap_or(0)
    }
}

/// Median of a non-empty slice (mean of the middle two for even lengths); 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// The modifiers of a case name that change the arithmetic's dtype or layout (`+bf16`,
/// `+channels-last`, ...), sorted; not `+recompute` or the stream choice.
fn compute_modifiers(name: &str) -> impl Iterator<Item = &str> {
    let mut m: Vec<&str> = name
        .split(" +")
        .skip(1)
        .map(|m| m.split(' ').next().unwrap_or_default())
        .filter(|m| ["fp32", "bf16", "fp16", "channels-last", "contiguous"].contains(m))
        .collect();
    m.sort_unstable();
    m.into_iter()
}

/// A whole benchmark run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub arch: String,
    pub dataset: String,
    pub input: [usize; 3],
    pub batch_size: usize,
    pub k: usize,
    pub devices: Vec<String>,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub repeats: usize,
    /// How GPU memory was measured, or why it was not.
    pub memory_note: String,
    pub peak_rss_bytes: Option<u64>,
    pub cases: Vec<CaseResult>,
}

impl BenchReport {
    fn find(&self, name: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|c| c.name == name)
    }
    /// The baseline `base` (`e2e`, `gpipe`) for `case`: the one computing as `case` does
    /// (`e2e +bf16` for `dgl async +bf16 +default-stream`: the stream modifiers mean nothing
    /// to a one-stage baseline), else plain `base`.
    pub fn baseline(&self, case: &CaseResult, base: &str) -> Option<&CaseResult> {
        let compute: Vec<&str> = compute_modifiers(&case.name).collect();
        self.cases
            .iter()
            .find(|c| {
                c.name.split(" +").next() == Some(base)
                    && !compute.is_empty()
                    && compute_modifiers(&c.name).eq(compute.iter().copied())
            })
            .or_else(|| self.find(base))
    }
    /// Median throughput of `case` over its baseline `base` (e.g. `e2e` or `gpipe`).
    pub fn speedup(&self, case: &CaseResult, base: &str) -> Option<f64> {
        let b = self.baseline(case, base)?.median();
        (b > 0.0).then(|| case.median() / b)
    }
    /// Speed-up over single-device e2e divided by the number of devices used.
    pub fn scaling_efficiency(&self, case: &CaseResult) -> Option<f64> {
        self.speedup(case, "e2e").map(|s| s / case.devices_used() as f64)
    }
    /// Largest stage's peak live bytes relative to e2e's.
    pub fn memory_ratio(&self, case: &CaseResult) -> Option<f64> {
        let e = self.baseline(case, "e2e")?.max_stage_bytes();
        (e > 0).then(|| case.max_stage_bytes() as f64 / e as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let case = |name: &str, ips: Vec<f64>, devices: usize, bytes: u64| CaseResult {
            name: name.into(),
            images_per_s: ips,
            devices: vec!["cpu".into(); devices],
            stages: vec![StageShare { peak_live_bytes: bytes, ..Default::default() }],
            ..Default::default()
        };
        let r = BenchReport {
            cases: vec![
                case("e2e", vec![100.0, 110.0, 90.0], 1, 1000),
                case("gpipe", vec![150.0], 2, 600),
                case("dgl async", vec![180.0], 2, 400),
            ],
            ..Default::default()
        };
        let dgl = &r.cases[2];
        assert_eq!(r.speedup(dgl, "e2e"), Some(1.8));
        assert_eq!(r.speedup(dgl, "gpipe"), Some(1.2));
        assert_eq!(r.scaling_efficiency(dgl), Some(0.9));
        assert_eq!(r.memory_ratio(dgl), Some(0.4));
    }

    #[test]
    fn a_case_is_measured_against_the_baseline_that_computes_as_it_does() {
        let case = |name: &str, ips: f64| CaseResult {
            name: name.into(),
            images_per_s: vec![ips],
            ..Default::default()
        };
        let r = BenchReport {
            cases: vec![
                case("e2e", 100.0),
                case("e2e +bf16", 200.0),
                case("dgl async +bf16 +default-stream", 300.0),
                case("dgl async +stream-per-stage", 150.0),
                case("dgl async +channels-last +bf16", 400.0),
            ],
            ..Default::default()
        };
        assert_eq!(r.speedup(&r.cases[2], "e2e"), Some(1.5), "bf16 against e2e +bf16");
        assert_eq!(r.speedup(&r.cases[3], "e2e"), Some(1.5), "float32 against e2e");
        // No e2e in bf16 and channels-last: the plain one.
        assert_eq!(r.speedup(&r.cases[4], "e2e"), Some(4.0));
        assert_eq!(r.speedup(&r.cases[1], "e2e"), Some(1.0));
    }
}

//! The run summary (`summary.json`): what a finished run trained, how fast, how well and in
//! how much memory, gathered over every replica. [`finish`] ends the run and writes it.

use crate::devices;
use crate::evaluate::EvalResult;
use crate::session::Session;
use anyhow::Result;
use mlaan_core::bench::AllocatorPeak;
use mlaan_core::config::{ComputeReport, RunConfig};
use mlaan_core::device::DeviceSpec;
use mlaan_core::metrics::StageWindow;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};
use tch::Device;

/// What a run reports in `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub method: String,
    pub arch: String,
    pub k: usize,
    pub schedule: String,
    pub dataset: String,
    pub devices: Vec<String>,
    /// Module ranges per stage.
    pub placement: Vec<[usize; 2]>,
    pub epochs: usize,
    pub seed: u64,
    /// Compute dtype, layout, streams and the CUDA math switches of the run.
    pub compute: ComputeReport,
    /// Optimizer steps since step 0, including those of runs this one resumed.
    pub steps: u64,
    /// Steps this process trained (after `--resume`, those since the checkpoint); the
    /// images/s figure counts these only.
    pub steps_this_run: u64,
    /// Samples per step on each replica (`train.batch_size`).
    pub batch_size: usize,
    /// Data-parallel replicas (processes) and the samples of one step over all of them.
    pub world_size: usize,
    /// With replicas: the library that reduced each module's gradients (`nccl`, `gloo`).
    pub reducers: Option<Vec<String>>,
    pub global_batch_size: usize,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Accuracy of each module's own classifier head on the test set (`null` where a module
    /// has none, e.g. module 0 under MLAAN or a contrastive head).
    pub module_accuracy: Vec<Option<f64>>,
    /// Training images per second over all replicas (their sum).
    pub train_images_per_s: f64,
    /// Each replica's own images/s and training time, by rank (one entry with one process).
    pub ranks: Vec<RankFigures>,
    pub train_s: f64,
    pub wall_s: f64,
    /// Training samples that could not be read and were skipped (`data.on_bad_sample`).
    pub skipped_samples: u64,
    /// Training batches dropped for a non-finite loss (`pipeline.on_nonfinite = "skip"`).
    pub skipped_batches: u64,
    pub stages: Vec<StageWindow>,
    pub peak_live_bytes: Vec<u64>,
    pub peak_rss_bytes: Option<u64>,
    pub gpu_memory: Option<Vec<devices::GpuMemory>>,
    /// The caching allocator's peaks over the run per CUDA device (`null` on CPU).
    pub allocator: Option<Vec<AllocatorPeak>>,
}

/// One replica's throughput.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RankFigures {
    pub rank: usize,
    pub host: String,
    pub images_per_s: f64,
    pub train_s: f64,
}

/// What the training loop measured, for the summary.
pub struct RunTotals {
    /// The step this process started from (0 unless resumed).
    pub resumed_at: u64,
    pub train_time: Duration,
    pub started: Instant,
    pub skipped_batches: u64,
}

/// End a finished run: join the stages, gather every replica's throughput, and (rank 0
/// only) write `model.safetensors` (the backbone alone: stem, blocks, classifier) when asked
/// and `summary.json`.
pub fn finish(
    mut s: Session,
    cfg: &RunConfig,
    out: &Path,
    save_model: bool,
    eval: &EvalResult,
    stages: Vec<StageWindow>,
    totals: RunTotals,
) -> Result<Summary> {
    if s.skipped_samples() > 0 {
        let n = s.skipped_samples();
        tracing::warn!("{n} training samples could not be read and were skipped");
    }
    let world = s.world().clone();
    let snapshots = if world.is_leader() { s.snapshots()? } else { Vec::new() };
    let (steps, skipped_samples, k) = (s.next_id(), s.skipped_samples(), s.plan().k());
    let placement = s.placement().groups.iter().map(|g| [g.start, g.end]).collect();
    let dataset = s.dataset_name().to_string();
    let devices = s.devices().to_vec();
    let reducers = s.reducers().map(|r| r.iter().map(ToString::to_string).collect());
    let final_bytes = s.finish()?;
    let steps_this_run = steps - totals.resumed_at;
    let train_s = totals.train_time.as_secs_f64();
    let mine = RankFigures {
        rank: world.rank(),
        host: crate::distributed::this_host(),
        images_per_s: (steps_this_run * cfg.train.batch_size as u64) as f64 / train_s.max(1e-9),
        train_s,
    };
    let ranks = world.gather("throughput", &mine)?;
    world.finish()?;
    let summary = Summary {
        method: cfg.method.name.to_string(),
        arch: cfg.model.arch.clone(),
        k,
        schedule: cfg.pipeline.schedule.to_string(),
        dataset,
        devices: DeviceSpec::names(&cfg.pipeline.devices),
        placement,
        epochs: cfg.train.epochs,
        seed: cfg.train.seed,
        compute: ComputeReport::of(cfg),
        steps,
        steps_this_run,
        batch_size: cfg.train.batch_size,
        world_size: world.size(),
        reducers,
        global_batch_size: cfg.train.batch_size * world.size(),
        test_accuracy: eval.accuracy(),
        test_loss: eval.loss(),
        module_accuracy: eval.module_accuracy(k),
        train_images_per_s: ranks.iter().map(|r| r.images_per_s).sum(),
        ranks,
        train_s,
        wall_s: totals.started.elapsed().as_secs_f64(),
        skipped_samples,
        skipped_batches: totals.skipped_batches,
        stages,
        peak_live_bytes: final_bytes.iter().map(|b| b.1).collect(),
        peak_rss_bytes: devices::peak_rss_bytes(),
        gpu_memory: gpu_indices(&devices).and_then(|i| devices::gpu_memory(&i)),
        allocator: match devices::allocator_peaks(&devices)? {
            peaks if peaks.is_empty() => None,
            peaks => Some(peaks),
        },
    };
    if world.is_leader() {
        if save_model {
            let model = out.join("model.safetensors");
            crate::export::write(&crate::export::backbone_of(&snapshots), &model)?;
        }
        std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    }
    Ok(summary)
}

fn gpu_indices(devices: &[Device]) -> Option<Vec<usize>> {
    let v = devices::distinct_gpus(devices);
    (!v.is_empty()).then_some(v)
}

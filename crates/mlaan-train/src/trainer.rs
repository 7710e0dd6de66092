//! The training loop, top to bottom: open the data, plan the network, place the modules,
//! start the pipeline, feed it epoch by epoch, evaluate, save, summarise.

use crate::cadence::{Boundary, Cadence};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::devices;
use crate::metrics::{bar_message, progress_bar, JsonlWriter};
use crate::skips::SkipGuard;
use anyhow::{bail, Context, Result};
use mlaan_core::config::{Method, PlacementRule, RunConfig, Schedule};
use mlaan_core::device::{cpu_threads_by_cost, cpu_threads_per_stage, DeviceSpec};
use mlaan_core::metrics::{MetricRecord, StageWindow};
use mlaan_core::placement::{place, Placement};
use mlaan_core::plan::{ImageSpec, NetworkPlan};
use mlaan_data::{Batch, Datasets, Loader, LoaderConfig};
use mlaan_engine::init::{initial_state, ModuleState};
use mlaan_engine::module::BatchTargets;
use mlaan_engine::optim::LrSchedule;
use mlaan_engine::pipeline::{
    Event, Fault, Forward, ModuleEval, ModuleSnapshot, Pipeline, PipelineSettings,
};
use mlaan_report::EventWriter;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

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
    /// Optimizer steps since step 0, including those of runs this one resumed.
    pub steps: u64,
    /// Steps this process trained (after `--resume`, those since the checkpoint); the
    /// images/s figure counts these only.
    pub steps_this_run: u64,
    pub batch_size: usize,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Accuracy of each module's own classifier head on the test set (`null` where a module
    /// has none, e.g. module 0 under MLAAN or a contrastive head).
    pub module_accuracy: Vec<Option<f64>>,
    pub train_images_per_s: f64,
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
}

/// Options of a run that are not part of its config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Inject a fault (tests and drills), `KIND@STAGE:BATCH`.
    pub fault: Option<Fault>,
    /// Write `model.safetensors` (the backbone alone) at the end.
    pub save_model: bool,
    /// `auto` (newest complete checkpoint of the run directory, if any) or a checkpoint path.
    pub resume: Option<String>,
    /// Set by a signal handler: drain, checkpoint and stop at the next batch boundary.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Drills: pause before a checkpoint's marker is written (so a test can kill the writer).
    pub checkpoint_pause: Option<Duration>,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    Finished(Box<Summary>),
    /// Stopped by a signal after writing `checkpoint` at `step`.
    Interrupted {
        checkpoint: PathBuf,
        step: u64,
    },
}

/// A started pipeline with its data: the pieces a run, a test or a benchmark drives.
pub struct Session {
    cfg: RunConfig,
    data: Datasets,
    plan: Arc<NetworkPlan>,
    placement: Placement,
    pipe: Pipeline,
    train_loader: Loader,
    steps_per_epoch: u64,
    /// Id of the next training batch (= optimizer steps taken when drained).
    next_id: u64,
    /// Whether batches carry the raw image (InfoPro's reconstruction target).
    needs_image: bool,
    /// Training samples dropped because they could not be read (`data.on_bad_sample = skip`).
    skipped_samples: u64,
    /// The first stage's GPU: batches are staged in pinned host memory on this (feeding)
    /// thread so that the stage's host-to-device copy is asynchronous. `None` on CPUs, or once
    /// pinning has failed.
    pin_for: Option<Device>,
    /// `pipeline.devices`, resolved once at start.
    devices: Vec<Device>,
}

impl Session {
    /// Open the data, plan the network, place it, and start every stage from the initial
    /// state of `cfg.train.seed`.
    pub fn start(cfg: &RunConfig, opts: &RunOptions) -> Result<Session> {
        Session::start_from(cfg, opts, None)
    }

    /// Like [`Session::start`], continuing from a checkpoint when one is given.
    pub fn start_from(
        cfg: &RunConfig,
        opts: &RunOptions,
        from: Option<Checkpoint>,
    ) -> Result<Session> {
        let data = mlaan_data::open(&cfg.data).context("opening the dataset")?;
        tracing::info!("{}", data.train.describe());
        tracing::info!("{}", data.test.describe());
        let plan = Arc::new(plan_for(cfg, &data)?);
        let devices = devices::resolve(&cfg.pipeline.devices)?;
        let image = data.info.image();
        let (placement, costs) = choose_placement(cfg, &plan, &devices, image)?;
        let threads = configure_threads(cfg, &placement, &devices, costs.as_deref());
        let train_loader = Loader::new(
            data.train.clone(),
            data.train_transform.clone(),
            LoaderConfig::train(&cfg.data, cfg.train.batch_size, cfg.train.seed),
        );
        let steps_per_epoch = train_loader.num_batches() as u64;
        if steps_per_epoch == 0 {
            bail!(
                "the training set ({} samples) gives no batch of {}",
                data.train.len(),
                cfg.train.batch_size
            );
        }
        let lr = LrSchedule::new(&cfg.optim, steps_per_epoch, cfg.train.epochs);
        let mut settings = pipeline_settings(cfg, &data, image, lr, opts);
        settings.intra_op_threads = threads;
        let (states, next_id) = match from {
            Some(c) => {
                check_compatible(&c, cfg, &plan, steps_per_epoch)?;
                tracing::info!("resuming from {} at step {}", c.dir.display(), c.meta.step);
                (c.modules, c.meta.step)
            }
            None => {
                let init = initial_state(&plan, image, cfg.train.seed)?;
                (
                    init.into_iter()
                        .enumerate()
                        .map(|(m, s)| ModuleSnapshot::initial(m, s))
                        .collect(),
                    0,
                )
            }
        };
        let stage_devs = stage_devices(&placement, &devices);
        let pipe = Pipeline::start(plan.clone(), settings, states, &placement, &stage_devs)?;
        let first_device = stage_devs[0];
        Ok(Session {
            cfg: cfg.clone(),
            pin_for: first_device.is_cuda().then_some(first_device),
            needs_image: plan.method.uses_infopro_loss(),
            data,
            plan,
            placement,
            pipe,
            train_loader,
            steps_per_epoch,
            next_id,
            skipped_samples: 0,
            devices,
        })
    }

    /// Feed training batches of `epoch` from the current position until the epoch ends,
    /// `stop_at` batches have been fed in total, or `on_batch` (which sees the events after
    /// every batch) returns `true`.
    pub fn feed_epoch(
        &mut self,
        epoch: usize,
        stop_at: u64,
        on_batch: &mut dyn FnMut(Vec<Event>) -> Result<bool>,
    ) -> Result<()> {
        let epoch_start = epoch as u64 * self.steps_per_epoch;
        let first = self.next_id.saturating_sub(epoch_start);
        if first >= self.steps_per_epoch || self.next_id >= stop_at {
            return Ok(());
        }
        for batch in self.train_loader.epoch_from(epoch, first as usize) {
            let batch =
                batch.with_context(|| format!("loading training batch {}", self.next_id))?;
            self.skipped_samples += batch.skipped as u64;
            if batch.is_empty() {
                continue;
            }
            let (x, targets) = to_tensors(&batch, self.needs_image);
            let (x, targets) = self.pinned(x, targets);
            self.send_batch(x, targets)?;
            if on_batch(self.pipe.take_events()?)? || self.next_id >= stop_at {
                break;
            }
        }
        Ok(())
    }

    /// The batch in pinned (page-locked) host memory when the first stage is a GPU; the
    /// image target shares the pinned storage. Falls back to pageable memory, once, with a
    /// warning, if libtorch cannot pin.
    fn pinned(&mut self, x: Tensor, targets: BatchTargets) -> (Tensor, BatchTargets) {
        let Some(device) = self.pin_for else { return (x, targets) };
        match x.f_pin_memory(device) {
            Ok(p) => {
                let image_u8 = targets.image_u8.as_ref().map(|_| p.shallow_clone());
                (p, BatchTargets { labels: targets.labels, image_u8 })
            }
            Err(e) => {
                tracing::warn!("cannot pin host memory for {device:?}, copying from pageable: {e}");
                self.pin_for = None;
                (x, targets)
            }
        }
    }

    /// Send one training mini-batch, as its micro-batches under GPipe (ids `next_id · M + j`).
    pub fn send_batch(&mut self, x: Tensor, targets: BatchTargets) -> Result<()> {
        let m = self.cfg.pipeline.micro_batches as i64;
        let id = self.next_id;
        self.next_id += 1;
        if m == 1 {
            return Ok(self.pipe.send(Forward::Train { id, x, targets })?);
        }
        let xs = x.chunk(m, 0);
        let ys = targets.labels.chunk(m, 0);
        let images = targets.image_u8.map(|t| t.chunk(m, 0));
        for (j, (x, labels)) in xs.into_iter().zip(ys).enumerate() {
            let image_u8 = images.as_ref().map(|v| v[j].shallow_clone());
            let id = id * m as u64 + j as u64;
            self.pipe.send(Forward::Train { id, x, targets: BatchTargets { labels, image_u8 } })?;
        }
        Ok(())
    }

    /// Id of the next training batch: the optimizer steps taken once drained.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    pub fn plan(&self) -> &NetworkPlan {
        &self.plan
    }

    pub fn num_stages(&self) -> usize {
        self.pipe.num_stages
    }

    /// The training loader (tests and the bench feed chosen batches).
    pub fn train_loader(&self) -> &Loader {
        &self.train_loader
    }

    /// Whether batches must carry the raw image (InfoPro's reconstruction target).
    pub fn needs_image(&self) -> bool {
        self.needs_image
    }

    /// A loader batch as the tensors `send_batch` takes.
    pub fn tensors(&self, batch: &Batch) -> (Tensor, BatchTargets) {
        to_tensors(batch, self.needs_image)
    }

    /// The events the stages sent since the last call (failures become the error).
    pub fn take_events(&mut self) -> Result<Vec<Event>> {
        Ok(self.pipe.take_events()?)
    }

    /// Bring the pipeline to a boundary with nothing in flight; returns the events meanwhile.
    pub fn drain(&mut self) -> Result<Vec<Event>> {
        Ok(self.pipe.drain()?)
    }

    /// Test-set accuracy of the backbone and of each module's head (after a drain).
    pub fn evaluate(&mut self) -> Result<EvalResult> {
        evaluate(&mut self.pipe, &self.data, &self.cfg)
    }

    /// CPU copies of every module (after a drain).
    pub fn snapshots(&mut self) -> Result<Vec<ModuleSnapshot>> {
        Ok(self.pipe.collect()?)
    }

    /// Write a checkpoint of the drained pipeline under `root` (see [`checkpoint`]).
    pub fn checkpoint(&mut self, root: &Path, pause: Option<Duration>) -> Result<PathBuf> {
        let modules = self.snapshots()?;
        let meta = CheckpointMeta {
            step: self.next_id,
            steps_per_epoch: self.steps_per_epoch,
            method: self.cfg.method.name.to_string(),
            arch: self.cfg.model.arch.clone(),
            k: self.plan.k(),
            schedule: self.cfg.pipeline.schedule.to_string(),
            seed: self.cfg.train.seed,
            placement: self.placement.groups.iter().map(|g| [g.start, g.end]).collect(),
            files: BTreeMap::new(),
        };
        let keep = self.cfg.checkpoint.keep_last;
        Ok(checkpoint::write(root, meta, &modules, &self.cfg.to_toml(), keep, pause)?)
    }

    /// Join every stage; returns (final, peak) live bytes per stage.
    pub fn finish(self) -> Result<Vec<(u64, u64)>> {
        Ok(self.pipe.finish()?)
    }
}

/// A checkpoint must come from the same network and the same data order.
fn check_compatible(c: &Checkpoint, cfg: &RunConfig, plan: &NetworkPlan, spe: u64) -> Result<()> {
    let m = &c.meta;
    let mismatch = |what: &str, had: String, now: String| {
        anyhow::anyhow!(
            "checkpoint {} has {what} {had} but the config asks for {now}",
            c.dir.display()
        )
    };
    if m.method != cfg.method.name.to_string() {
        return Err(mismatch("method", m.method.clone(), cfg.method.name.to_string()));
    }
    if m.arch != cfg.model.arch {
        return Err(mismatch("arch", m.arch.clone(), cfg.model.arch.clone()));
    }
    if m.k != plan.k() {
        return Err(mismatch("K", m.k.to_string(), plan.k().to_string()));
    }
    if m.steps_per_epoch != spe {
        return Err(mismatch("steps per epoch", m.steps_per_epoch.to_string(), spe.to_string()));
    }
    if m.seed != cfg.train.seed {
        return Err(mismatch("seed", m.seed.to_string(), cfg.train.seed.to_string()));
    }
    Ok(())
}

/// Find what `--resume` names: `auto` is the newest complete checkpoint under `ckpt_root`
/// (none is fine: a fresh start), anything else a checkpoint directory that must load.
pub fn find_resume(spec: &str, ckpt_root: &Path) -> Result<Option<Checkpoint>> {
    if spec == "auto" {
        return Ok(checkpoint::latest(ckpt_root)?);
    }
    let dir = Path::new(spec);
    Ok(Some(checkpoint::read(dir).with_context(|| format!("--resume {spec}"))?))
}

/// Train `cfg`, writing the run directory `out`.
pub fn train(cfg: &RunConfig, out: &Path, opts: &RunOptions) -> Result<Outcome> {
    let wall = Instant::now();
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run directory {}", out.display()))?;
    std::fs::write(out.join("config.toml"), cfg.to_toml())?;
    let ckpt_root = out.join("ckpt");
    let from = match &opts.resume {
        Some(spec) => find_resume(spec, &ckpt_root)?,
        None => None,
    };
    let resumed = from.as_ref().map(|c| c.meta.step);
    let mut s = Session::start_from(cfg, opts, from)?;
    let mut log = MetricsLog::new(out, cfg, &s.plan, s.pipe.num_stages, resumed)?;
    let cadence = Cadence::of(cfg, s.steps_per_epoch);
    let interrupted = || opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
    let bar = progress_bar(cadence.total_steps, "train");
    bar.set_position(s.next_id);
    let mut train_time = Duration::ZERO;
    let mut eval = EvalResult::default();
    while s.next_id < cadence.total_steps {
        // Feed up to the next boundary, drain there, then do what the boundary asks.
        let epoch = cadence.epoch_of(s.next_id);
        let t = Instant::now();
        if !interrupted() {
            s.feed_epoch(epoch, cadence.next_stop(s.next_id), &mut |events| {
                bar.inc(1);
                log.absorb(events, epoch, &bar)?;
                Ok(interrupted())
            })?;
        }
        log.absorb(s.drain()?, epoch, &bar)?;
        train_time += t.elapsed();
        let stopping = interrupted();
        let at = match stopping {
            true => Boundary { checkpoint: true, ..Boundary::default() },
            false => cadence.at(s.next_id),
        };
        if at.evaluate {
            eval = s.evaluate()?;
            log.eval(s.next_id, epoch, &eval)?;
            tracing::info!("epoch {epoch}: test accuracy {:.4}", eval.accuracy());
        }
        if at.checkpoint {
            let checkpoint = s.checkpoint(&ckpt_root, opts.checkpoint_pause)?;
            if stopping {
                let step = s.next_id;
                bar.abandon_with_message(format!("interrupted at step {step}"));
                log.plot();
                s.finish()?;
                return Ok(Outcome::Interrupted { checkpoint, step });
            }
        }
    }
    bar.finish_and_clear();
    if resumed.is_some() && eval.modules.is_empty() {
        // Resumed at the very end: evaluate what was loaded.
        eval = s.evaluate()?;
    }
    let totals = RunTotals {
        resumed_at: resumed.unwrap_or(0),
        train_time,
        started: wall,
        skipped_batches: 0,
    };
    let totals = RunTotals { skipped_batches: log.skips.total(), ..totals };
    let summary = finish(s, cfg, out, opts.save_model, &eval, log.last_windows(), totals)?;
    Ok(Outcome::Finished(Box::new(summary)))
}

/// What the training loop measured, for the summary.
struct RunTotals {
    /// The step this process started from (0 unless resumed).
    resumed_at: u64,
    train_time: Duration,
    started: Instant,
    skipped_batches: u64,
}

/// End a finished run: join the stages, write `model.safetensors` (the backbone alone: stem,
/// blocks, classifier) when asked and `summary.json`.
fn finish(
    mut s: Session,
    cfg: &RunConfig,
    out: &Path,
    save_model: bool,
    eval: &EvalResult,
    stages: Vec<StageWindow>,
    totals: RunTotals,
) -> Result<Summary> {
    if s.skipped_samples > 0 {
        tracing::warn!("{} training samples could not be read and were skipped", s.skipped_samples);
    }
    let snapshots = s.snapshots()?;
    let (steps, skipped_samples, k) = (s.next_id, s.skipped_samples, s.plan.k());
    let placement = s.placement.groups.iter().map(|g| [g.start, g.end]).collect();
    let dataset = s.data.info.name.clone();
    let devices = std::mem::take(&mut s.devices);
    let final_bytes = s.finish()?;
    if save_model {
        let model = out.join("model.safetensors");
        crate::export::write(&crate::export::backbone_of(&snapshots), &model)?;
    }
    let steps_this_run = steps - totals.resumed_at;
    let train_images = steps_this_run * cfg.train.batch_size as u64;
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
        steps,
        steps_this_run,
        batch_size: cfg.train.batch_size,
        test_accuracy: eval.accuracy(),
        test_loss: eval.loss(),
        module_accuracy: eval.module_accuracy(k),
        train_images_per_s: train_images as f64 / totals.train_time.as_secs_f64().max(1e-9),
        train_s: totals.train_time.as_secs_f64(),
        wall_s: totals.started.elapsed().as_secs_f64(),
        skipped_samples,
        skipped_batches: totals.skipped_batches,
        stages,
        peak_live_bytes: final_bytes.iter().map(|b| b.1).collect(),
        peak_rss_bytes: devices::peak_rss_bytes(),
        gpu_memory: gpu_indices(&devices).and_then(|i| devices::gpu_memory(&i)),
    };
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// The network plan for a config on an opened dataset.
pub fn plan_for(cfg: &RunConfig, data: &Datasets) -> Result<NetworkPlan> {
    let image = data.info.image();
    Ok(NetworkPlan::new(cfg, image.chw(), image.classes)?)
}

pub fn pipeline_settings(
    cfg: &RunConfig,
    data: &Datasets,
    image: ImageSpec,
    lr: LrSchedule,
    opts: &RunOptions,
) -> PipelineSettings {
    PipelineSettings {
        schedule: cfg.pipeline.schedule,
        in_flight: cfg.pipeline.in_flight,
        optim: cfg.optim.clone(),
        lr,
        ema_momentum: cfg.method.ema_momentum,
        ema_lag: cfg.method.ema_lag,
        image,
        mean: data.info.mean.clone(),
        std: data.info.std.clone(),
        log_every: cfg.train.log_every as u64,
        accumulate: cfg.pipeline.micro_batches,
        on_nonfinite: cfg.pipeline.on_nonfinite,
        fault: opts.fault,
        intra_op_threads: Vec::new(),
        recompute: cfg.pipeline.recompute,
    }
}

/// Largest batch the placement profile runs.
const PROFILE_BATCH: usize = 32;

/// Which modules run on which device: everything on one stage for `sequential` and plain
/// e2e; one module per device when K ≤ D; otherwise contiguous groups balanced by a measured
/// profile (`auto`, `profile`) or by backbone FLOPs (`flops`).
pub fn choose_placement(
    cfg: &RunConfig,
    plan: &NetworkPlan,
    devices: &[Device],
    image: ImageSpec,
) -> Result<(Placement, Option<Vec<f64>>)> {
    if cfg.pipeline.schedule == Schedule::Sequential || plan.method == Method::E2e && plan.k() == 1
    {
        return Ok((Placement { groups: std::iter::once(0..plan.k()).collect() }, None));
    }
    let d = devices.len();
    if d == 1 {
        return Ok((Placement { groups: std::iter::once(0..plan.k()).collect() }, None));
    }
    if plan.k() <= d || cfg.pipeline.placement == PlacementRule::Flops {
        return Ok((place(&plan.module_macs(), d)?, None));
    }
    // Profile on the first device with the threads each stage will have.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_stages = devices.iter().filter(|x| **x == Device::Cpu).count();
    let threads = match cfg.pipeline.intra_op_threads {
        0 => cpu_threads_per_stage(cores, cpu_stages),
        n => n,
    };
    tch::set_num_threads(threads as i32);
    let t = Instant::now();
    // Relative costs are what matters: a small batch keeps the profile short on a CPU.
    let batch = cfg.train.batch_size.min(PROFILE_BATCH);
    let costs = mlaan_engine::profile::module_costs(
        plan,
        image,
        devices[0],
        batch,
        cfg.pipeline.schedule,
        2,
    )?;
    let p = place(&costs, d)?;
    tracing::info!(
        "placement from a {:.1} s profile (ms per batch: {}): {}",
        t.elapsed().as_secs_f64(),
        costs.iter().map(|c| format!("{:.0}", c * 1e3)).collect::<Vec<_>>().join(" "),
        p.groups.iter().map(|g| format!("{}..{}", g.start, g.end)).collect::<Vec<_>>().join(" | ")
    );
    Ok((p, Some(costs)))
}

/// The device of each stage.
fn stage_devices(p: &Placement, devices: &[Device]) -> Vec<Device> {
    (0..p.num_stages()).map(|s| devices[s.min(devices.len() - 1)]).collect()
}

/// Intra-op threads of each stage: CPU stages share the cores, in proportion to their
/// measured cost when there is a profile, evenly otherwise (`pipeline.intra_op_threads`
/// overrides). Intra-op parallelism is per thread, so each stage thread sets its own.
fn configure_threads(
    cfg: &RunConfig,
    p: &Placement,
    devices: &[Device],
    module_costs: Option<&[f64]>,
) -> Vec<usize> {
    let stage_devs = stage_devices(p, devices);
    let cpu: Vec<usize> = (0..p.num_stages()).filter(|&s| stage_devs[s] == Device::Cpu).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let even = cpu_threads_per_stage(cores, cpu.len());
    let mut threads = vec![even; p.num_stages()];
    if cfg.pipeline.intra_op_threads > 0 {
        threads = vec![cfg.pipeline.intra_op_threads; p.num_stages()];
    } else if let Some(costs) = module_costs {
        let stage_cost = |s: usize| p.groups[s].clone().map(|m| costs[m]).sum::<f64>();
        let by_cost =
            cpu_threads_by_cost(cores, &cpu.iter().map(|&s| stage_cost(s)).collect::<Vec<_>>());
        for (&s, t) in cpu.iter().zip(by_cost) {
            threads[s] = t;
        }
    }
    tch::set_num_threads(threads.iter().copied().max().unwrap_or(1) as i32);
    tracing::info!("{} stage(s); intra-op threads per stage: {threads:?}", p.num_stages());
    threads
}

fn gpu_indices(devices: &[Device]) -> Option<Vec<usize>> {
    let v = devices::distinct_gpus(devices);
    (!v.is_empty()).then_some(v)
}

/// A loader batch as tensors: raw `u8` images (NCHW) and `i64` labels.
pub fn to_tensors(batch: &Batch, needs_image: bool) -> (Tensor, BatchTargets) {
    let [n, c, h, w] = batch.shape.map(|d| d as i64);
    let x = Tensor::from_slice(&batch.images).view([n, c, h, w]);
    let labels = Tensor::from_slice(&batch.labels);
    let image_u8 = needs_image.then(|| x.shallow_clone());
    (x, BatchTargets { labels, image_u8 })
}

/// Test-set results gathered from the stages.
#[derive(Debug, Default, Clone)]
pub struct EvalResult {
    pub modules: Vec<ModuleEval>,
}

impl EvalResult {
    fn last(&self) -> Option<&ModuleEval> {
        self.modules.iter().max_by_key(|m| m.module)
    }
    pub fn accuracy(&self) -> f64 {
        self.last().map_or(0.0, |m| m.correct as f64 / m.seen.max(1) as f64)
    }
    pub fn loss(&self) -> f64 {
        self.last().map_or(f64::NAN, |m| m.loss_sum / m.seen.max(1) as f64)
    }
    pub fn module_accuracy(&self, k: usize) -> Vec<Option<f64>> {
        (0..k)
            .map(|i| {
                self.modules
                    .iter()
                    .find(|m| m.module == i && m.has_head && m.seen > 0)
                    .map(|m| m.correct as f64 / m.seen as f64)
            })
            .collect()
    }
}

/// Run the test set through the pipeline (after a drain) and gather every stage's counts.
pub fn evaluate(pipe: &mut Pipeline, data: &Datasets, cfg: &RunConfig) -> Result<EvalResult> {
    let bs = match cfg.train.eval_batch_size {
        0 => cfg.train.batch_size,
        n => n,
    };
    let loader = Loader::new(
        data.test.clone(),
        data.eval_transform.clone(),
        LoaderConfig::eval(&cfg.data, bs),
    );
    for batch in loader.epoch(0) {
        let batch = batch.context("loading a test batch")?;
        let (x, t) = to_tensors(&batch, false);
        pipe.send(Forward::Eval { x, labels: t.labels })?;
    }
    Ok(EvalResult { modules: pipe.end_eval()? })
}

/// The test set through a one-stage pipeline holding `state`, the one module of `plan`: how
/// `mlaan-pipe eval` measures a saved backbone, by the same path (normalisation on the first
/// stage, the stage's evaluation counts, [`evaluate`]) that `train` uses.
pub fn evaluate_module(
    cfg: &RunConfig,
    data: &Datasets,
    plan: NetworkPlan,
    state: ModuleState,
    device: Device,
) -> Result<EvalResult> {
    let lr = LrSchedule::constant(cfg.optim.lr);
    let settings = pipeline_settings(cfg, data, data.info.image(), lr, &RunOptions::default());
    let placement = Placement { groups: std::iter::once(0..plan.k()).collect() };
    let states = vec![ModuleSnapshot::initial(0, state)];
    let mut pipe = Pipeline::start(Arc::new(plan), settings, states, &placement, &[device])?;
    let result = evaluate(&mut pipe, data, cfg);
    pipe.finish()?;
    result
}

/// A stage's window, its learning rate and its modules' term losses.
type StageReport = (StageWindow, f64, Vec<(usize, Vec<f64>)>);

/// Collects per-stage metric windows into records and writes them to every sink:
/// `metrics.jsonl`, the TensorBoard event file (`train.tensorboard`), the progress bar, and
/// `curves.png` at every evaluation.
struct MetricsLog {
    dir: PathBuf,
    jsonl: JsonlWriter,
    events: Option<EventWriter>,
    /// Names of each module's loss terms, in the order its stage reports them.
    term_names: Vec<Vec<String>>,
    stages: usize,
    pending: BTreeMap<u64, Vec<Option<StageReport>>>,
    last: Vec<Option<StageWindow>>,
    start: Instant,
    /// Batches dropped for non-finite losses; too many in a row stop the run.
    skips: SkipGuard,
}

impl MetricsLog {
    /// `resume_step`: continue the file, dropping records past the checkpoint that the
    /// resumed run will write again. A resumed run starts a new event file, which TensorBoard
    /// reads together with the earlier ones.
    fn new(
        out: &Path,
        cfg: &RunConfig,
        plan: &NetworkPlan,
        stages: usize,
        resume_step: Option<u64>,
    ) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        let append = resume_step.is_some();
        if let Some(step) = resume_step {
            let kept: String = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| serde_json::from_str::<MetricRecord>(l).is_ok_and(|r| r.step() <= step))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&path, kept)?;
        }
        let events = if cfg.train.tensorboard {
            let mut w = EventWriter::create(out)?;
            w.text(resume_step.unwrap_or(0), "config", &indented(&cfg.to_toml()))?;
            Some(w)
        } else {
            None
        };
        Ok(MetricsLog {
            dir: out.to_path_buf(),
            jsonl: if append { JsonlWriter::append(&path)? } else { JsonlWriter::create(&path)? },
            events,
            term_names: plan
                .modules
                .iter()
                .map(|m| m.terms.iter().map(|t| t.kind.name().to_string()).collect())
                .collect(),
            stages,
            pending: BTreeMap::new(),
            last: vec![None; stages],
            start: Instant::now(),
            skips: SkipGuard::new(cfg.pipeline.max_consecutive_skips),
        })
    }

    fn absorb(
        &mut self,
        events: Vec<Event>,
        epoch: usize,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        for ev in events {
            let (stage, window, step, lr, term_losses) = match ev {
                Event::Window { stage, window, step, lr, term_losses } => {
                    (stage, window, step, lr, term_losses)
                }
                Event::Skipped { stage, batch, cause } => {
                    self.skips.note(stage, batch, cause)?;
                    continue;
                }
                _ => continue,
            };
            self.last[stage] = Some(window.clone());
            let slot = self.pending.entry(step).or_insert_with(|| vec![None; self.stages]);
            slot[stage] = Some((window, lr, term_losses));
            if slot.iter().all(|s| s.is_some()) {
                let slot = self.pending.remove(&step).expect("present");
                let mut stages = Vec::with_capacity(self.stages);
                let mut loss = f64::NAN;
                let mut lr_out = 0.0;
                for (mut w, lr, terms) in slot.into_iter().flatten() {
                    // The network's loss is the last module's last term (its classifier).
                    if let Some((_, l)) = terms.last() {
                        if let Some(v) = l.last() {
                            loss = *v;
                        }
                    }
                    w.loss = terms.iter().flat_map(|(_, l)| l.iter().copied()).collect();
                    lr_out = lr;
                    stages.push(w);
                }
                let ips = stages.last().map_or(0.0, |w| w.images_per_s);
                bar.set_message(bar_message(ips, &stages, loss, lr_out));
                self.write(MetricRecord::Train {
                    step,
                    epoch,
                    loss,
                    lr: lr_out,
                    images_per_s: ips,
                    elapsed_s: self.start.elapsed().as_secs_f64(),
                    skipped_batches: self.skips.total(),
                    stages,
                })?;
            }
        }
        Ok(())
    }

    /// Log an evaluation and redraw the curves with it.
    fn eval(&mut self, step: u64, epoch: usize, e: &EvalResult) -> Result<()> {
        let k = e.modules.iter().map(|m| m.module + 1).max().unwrap_or(0);
        self.write(MetricRecord::Eval {
            step,
            epoch,
            test_accuracy: e.accuracy(),
            test_loss: e.loss(),
            module_accuracy: e.module_accuracy(k),
        })?;
        self.plot();
        Ok(())
    }

    fn write(&mut self, record: MetricRecord) -> Result<()> {
        self.jsonl.write(&record)?;
        if let Some(events) = &mut self.events {
            let scalars = mlaan_report::tensorboard_scalars(&record, &self.term_names);
            events.scalars(record.step(), &scalars)?;
        }
        Ok(())
    }

    /// Redraw `curves.png`. A picture that cannot be drawn is a warning, never a failed run.
    fn plot(&self) {
        if let Err(e) = mlaan_report::training_plots(&self.dir.join("metrics.jsonl"), &self.dir) {
            tracing::warn!("curves.png not drawn: {e}");
        }
    }

    fn last_windows(&self) -> Vec<StageWindow> {
        self.last.iter().flatten().cloned().collect()
    }
}

/// Text indented by four spaces: a Markdown code block, as TensorBoard's Text tab renders it.
fn indented(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// A new run directory for `cfg`: `runs/<method>-<arch>-YYYYMMDD-HHMMSS` (see [`run_dir`]).
///
/// [`run_dir`]: crate::run_dir
pub fn new_run_dir(cfg: &RunConfig) -> Result<PathBuf> {
    let name = format!("{}-{}", cfg.method.name, cfg.model.arch);
    crate::run_dir::create_run_dir(Path::new("runs"), &name)
        .with_context(|| format!("cannot create a run directory under runs/ for {name}"))
}

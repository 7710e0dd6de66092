//! A started pipeline with its data: the session a run, a test or the bench drives. It opens
//! the data, plans the network, places it, starts the engine's pipeline from an initial state
//! or a checkpoint, and feeds it batches.

use crate::checkpoint::{self, resume, Checkpoint, CheckpointMeta};
use crate::devices;
use crate::distributed::World;
use crate::evaluate::{evaluate, EvalResult};
use crate::placement::{choose_placement, configure_threads, stage_devices};
use anyhow::{bail, Context, Result};
use mlaan_core::config::RunConfig;
use mlaan_core::micro::MicroBatches;
use mlaan_core::placement::Placement;
use mlaan_core::plan::{ImageSpec, NetworkPlan};
use mlaan_data::{Batch, Datasets, Loader, LoaderConfig};
use mlaan_dist::Reducer;
use mlaan_engine::init::initial_state;
use mlaan_engine::optim::LrSchedule;
use mlaan_engine::pipeline::{ComputeSettings, Fault, Pipeline, PipelineSettings};
use mlaan_engine::wire::BatchTargets;
use mlaan_engine::wire::{Event, Forward, ModuleSnapshot};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

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
    /// The data-parallel replicas this process is one of (`None`: it runs alone).
    pub world: Option<Arc<World>>,
}

impl RunOptions {
    /// The world of the run: the one given, or this process alone.
    pub fn world(&self) -> Arc<World> {
        self.world.clone().unwrap_or_else(|| Arc::new(World::single()))
    }
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
    /// This rank's slice of `pipeline.devices`, resolved once at start.
    devices: Vec<Device>,
    world: Arc<World>,
    /// The library reducing each module's gradients across the replicas (`None` alone).
    reducers: Option<Vec<Reducer>>,
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
        let world = opts.world();
        let data = mlaan_data::open(&cfg.data).context("opening the dataset")?;
        tracing::info!("{}", data.train.describe());
        tracing::info!("{}", data.test.describe());
        let plan = Arc::new(plan_for(cfg, &data)?);
        let devices = devices::resolve(&world.local_devices(&cfg.pipeline.devices)?)?;
        let image = data.info.image();
        let cores = world.local_cores();
        // Rank 0 places (a measured placement could differ between ranks); all follow it.
        let (placement, costs) = world
            .rank0_decides("placement", || choose_placement(cfg, &plan, &devices, image, cores))?;
        let threads = configure_threads(cfg, &placement, &devices, costs.as_deref(), cores);
        let loader_cfg = LoaderConfig {
            shard_rank: world.rank(),
            shard_count: world.size(),
            ..LoaderConfig::train(&cfg.data, cfg.train.batch_size, cfg.train.seed)
        };
        let train_loader =
            Loader::new(data.train.clone(), data.train_transform.clone(), loader_cfg);
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
        let stage_devs = stage_devices(&placement, &devices);
        // Launched (torchrun, SLURM, `launch`): every module joins its group across the
        // replicas, each reduced by the library the ranks choose together.
        let mut reducers = None;
        if let Some(mut replicas) = world.replicas(Vec::new()) {
            let module_devices: Vec<Device> =
                (0..plan.k()).map(|m| stage_devs[placement.stage_of(m)]).collect();
            let choice = crate::reducers::choose(&world, cfg.distributed.backend, &module_devices)?;
            reducers = Some(choice.reducers.clone());
            replicas.reducers = choice.reducers;
            settings.replicas = Some(replicas);
        }
        resume::agree(&world, from.as_ref())?;
        let (states, next_id) = match from {
            Some(c) => {
                resume::check_compatible(&c, cfg, &plan, steps_per_epoch, world.size())?;
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
        if stage_devs.iter().any(|d| d.is_cuda()) {
            // Process-wide in libtorch; the per-thread settings are each stage's own.
            mlaan_accel::set_cuda_math(cfg.train.cudnn_benchmark, cfg.train.tf32)?;
        }
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
            world,
            reducers,
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

    /// Send one training mini-batch: as its micro-batches under GPipe, numbered by
    /// `MicroBatches::ids` of this step.
    pub fn send_batch(&mut self, x: Tensor, targets: BatchTargets) -> Result<()> {
        let micro = MicroBatches::new(self.cfg.pipeline.micro_batches);
        let ids = micro.ids(self.next_id);
        self.next_id += 1;
        if micro.per_step() == 1 {
            return Ok(self.pipe.send(Forward::Train { id: ids.start, x, targets })?);
        }
        let m = micro.per_step() as i64;
        let xs = x.chunk(m, 0);
        let ys = targets.labels.chunk(m, 0);
        let images = targets.image_u8.map(|t| t.chunk(m, 0));
        for (j, ((x, labels), id)) in xs.into_iter().zip(ys).zip(ids).enumerate() {
            let image_u8 = images.as_ref().map(|v| v[j].shallow_clone());
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

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Training samples dropped because they could not be read.
    pub fn skipped_samples(&self) -> u64 {
        self.skipped_samples
    }

    pub fn dataset_name(&self) -> &str {
        &self.data.info.name
    }

    /// `pipeline.devices`, resolved.
    pub fn devices(&self) -> &[Device] {
        &self.devices
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
        evaluate(&mut self.pipe, &self.data, &self.cfg, &self.world)
    }

    /// CPU copies of every module (after a drain).
    pub fn snapshots(&mut self) -> Result<Vec<ModuleSnapshot>> {
        Ok(self.pipe.collect()?)
    }

    /// The library reducing each module's gradients across the replicas (`None` alone).
    pub fn reducers(&self) -> Option<&[Reducer]> {
        self.reducers.as_deref()
    }

    /// This process's place among the replicas.
    pub fn world(&self) -> &Arc<World> {
        &self.world
    }

    /// Write a checkpoint of the drained pipeline under `root` (see [`checkpoint`]). Only
    /// rank 0 writes (every replica holds the same weights); the others return its path.
    pub fn checkpoint(&mut self, root: &Path, pause: Option<Duration>) -> Result<PathBuf> {
        if !self.world.is_leader() {
            return Ok(root.join(checkpoint::dir_name(self.next_id)));
        }
        let modules = self.snapshots()?;
        let meta = CheckpointMeta::of(
            &self.cfg,
            self.plan.k(),
            &self.placement,
            self.next_id,
            self.steps_per_epoch,
            self.world.size(),
        );
        let keep = self.cfg.checkpoint.keep_last;
        Ok(checkpoint::write(root, meta, &modules, &self.cfg.to_toml(), keep, pause)?)
    }

    /// Join every stage; returns (final, peak) live bytes per stage.
    pub fn finish(self) -> Result<Vec<(u64, u64)>> {
        Ok(self.pipe.finish()?)
    }
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
        micro: MicroBatches::new(cfg.pipeline.micro_batches),
        on_nonfinite: cfg.pipeline.on_nonfinite,
        fault: opts.fault,
        intra_op_threads: Vec::new(),
        recompute: cfg.pipeline.recompute,
        replicas: None,
        compute: ComputeSettings {
            precision: cfg.train.precision,
            memory_format: cfg.train.memory_format,
            streams: cfg.pipeline.streams,
        },
    }
}

/// A loader batch as tensors: raw `u8` images (NCHW) and `i64` labels.
pub fn to_tensors(batch: &Batch, needs_image: bool) -> (Tensor, BatchTargets) {
    let [n, c, h, w] = batch.shape.map(|d| d as i64);
    let x = Tensor::from_slice(&batch.images).view([n, c, h, w]);
    let labels = Tensor::from_slice(&batch.labels);
    let image_u8 = needs_image.then(|| x.shallow_clone());
    (x, BatchTargets { labels, image_u8 })
}

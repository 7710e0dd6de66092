//! The parallel loader: worker threads decode and augment whole batches while the trainer
//! consumes earlier ones.
//!
//! ```text
//!   consumer (EpochStream::next)                 workers (N threads)
//!   ───────────────────────────                  ───────────────────
//!   issue batch numbers ──jobs (window W)──▶ take b, build batch b (load_into per sample)
//!   reorder / yield   ◀──results──────────── send (b, Result<Batch>)
//!   after each yield: issue the next batch number
//! ```
//!
//! At most `W = prefetch + workers` batches are issued and not yet yielded, so both channels
//! and the reorder buffer are bounded and no send ever blocks. Dropping the stream sets a stop
//! flag (checked between samples) and disconnects a stop channel that every idle worker
//! selects on, then joins all threads.
//!
//! Determinism: the epoch order is a permutation seeded by `(seed, epoch)`, and the RNG of
//! each sample's augmentation is seeded by `(seed, epoch, sample index)`; no RNG is shared
//! between threads, so the batches are identical for any number of workers.

use crate::transform::Transform;
use crate::{DataError, Dataset, ImageShape};
use crossbeam_channel::{bounded, select, Receiver, Sender};
use mlaan_core::config::{DataConfig, OnBadSample};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One batch of augmented images, ready to become a tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub epoch: usize,
    /// Batch number within the epoch (for this shard), counting from 0 even when resumed.
    pub index: usize,
    /// Dataset indices of the images, in order (skipped samples removed).
    pub sample_ids: Vec<usize>,
    /// `N*C*H*W` bytes.
    pub images: Vec<u8>,
    /// `[N, C, H, W]`; `[0, 0, 0, 0]` when every sample of the batch was skipped.
    pub shape: [usize; 4],
    pub labels: Vec<i64>,
    /// Bad samples dropped from this batch (`on_bad_sample = "skip"`).
    pub skipped: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.shape[0]
    }
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    /// Decoder threads; 0 = the available cores.
    pub workers: usize,
    /// Batches decoded ahead of the consumer (beyond one per worker).
    pub prefetch: usize,
    /// Yield batches in batch-number order (otherwise as soon as they are ready).
    pub ordered: bool,
    pub shard_rank: usize,
    pub shard_count: usize,
    /// Resume position within the epoch: batches before it are not produced.
    pub start_batch: usize,
    pub on_bad_sample: OnBadSample,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 128,
            shuffle: true,
            drop_last: false,
            seed: 0,
            workers: 0,
            prefetch: 4,
            ordered: true,
            shard_rank: 0,
            shard_count: 1,
            start_batch: 0,
            on_bad_sample: OnBadSample::Stop,
        }
    }
}

impl LoaderConfig {
    /// Training settings from the `[data]` section: shuffled, last partial batch dropped.
    pub fn train(data: &DataConfig, batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: true,
            seed,
            workers: data.workers,
            prefetch: data.prefetch,
            on_bad_sample: data.on_bad_sample,
            ..LoaderConfig::default()
        }
    }
    /// Evaluation settings: dataset order, every sample.
    pub fn eval(data: &DataConfig, batch_size: usize) -> Self {
        LoaderConfig {
            shuffle: false,
            drop_last: false,
            ..LoaderConfig::train(data, batch_size, 0)
        }
    }

    fn check(&self) -> Result<(), DataError> {
        if self.batch_size == 0 {
            return Err(DataError::Loader("batch_size must be at least 1".into()));
        }
        if self.shard_count == 0 || self.shard_rank >= self.shard_count {
            return Err(DataError::Loader(format!(
                "shard rank {} is not below shard count {}",
                self.shard_rank, self.shard_count
            )));
        }
        Ok(())
    }
}

/// Hashes integers into one RNG seed (splitmix64 finalizer over a running state), so that
/// nearby `(seed, epoch, index)` triples give unrelated streams.
pub(crate) fn mix(parts: &[u64]) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    parts.iter().fold(0x6d6c_6161_6e00_0000, |h, &p| splitmix(h ^ splitmix(p)))
}

const PERMUTATION: u64 = 1;
const AUGMENT: u64 = 2;

/// The RNG a sample's augmentation draws from.
pub type SampleRng = ChaCha8Rng;

/// The RNG for sample `index`'s augmentation in `epoch`.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> SampleRng {
    ChaCha8Rng::seed_from_u64(mix(&[seed, epoch as u64, index as u64, AUGMENT]))
}

pub struct Loader {
    dataset: Arc<dyn Dataset>,
    transform: Transform,
    cfg: LoaderConfig,
}

impl Loader {
    pub fn new(dataset: Arc<dyn Dataset>, transform: Transform, cfg: LoaderConfig) -> Self {
        Loader { dataset, transform, cfg }
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// This shard's samples for `epoch`, in order. Every shard cuts the same permutation into
    /// global batches of `shard_count × batch_size` positions and takes the `shard_rank`-th
    /// run of `batch_size` of each, then its equal part of the tail: shards are disjoint and
    /// equally long, and shard r's batch b is exactly micro-batch r of one process's global
    /// batch b (so R replicas reproduce one process with R micro-batches, BatchNorm included).
    /// Without `drop_last` (evaluation) the last `n mod R` samples go one each to the first
    /// shards, so that together the shards hold every sample once.
    /// Unlike PyTorch's DistributedSampler, a share is contiguous within its global batch, not
    /// strided.
    pub fn epoch_samples(&self, epoch: usize) -> Vec<usize> {
        if self.cfg.check().is_err() {
            return Vec::new();
        }
        let n = self.dataset.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.cfg.shuffle {
            let mut rng =
                ChaCha8Rng::seed_from_u64(mix(&[self.cfg.seed, epoch as u64, PERMUTATION]));
            order.shuffle(&mut rng);
        }
        let (count, rank, bs) = (self.cfg.shard_count, self.cfg.shard_rank, self.cfg.batch_size);
        if count == 1 {
            return order;
        }
        let global = count * bs;
        let full = n / global;
        let tail = (n - full * global) / count;
        let mut mine = Vec::with_capacity(full * bs + tail);
        for g in 0..full {
            mine.extend_from_slice(&order[g * global + rank * bs..][..bs]);
        }
        mine.extend_from_slice(&order[full * global + rank * tail..][..tail]);
        let rest = full * global + count * tail;
        if !self.cfg.drop_last && rest + rank < n {
            mine.push(order[rest + rank]);
        }
        mine
    }

    /// Batches per epoch for this shard (before `start_batch` is applied).
    pub fn num_batches(&self) -> usize {
        if self.cfg.check().is_err() {
            return 0;
        }
        let (n, count, bs) = (self.dataset.len(), self.cfg.shard_count, self.cfg.batch_size);
        let per_shard = match count {
            1 => n,
            _ => {
                let tail = n % (count * bs);
                let extra = !self.cfg.drop_last && self.cfg.shard_rank < tail % count;
                n / (count * bs) * bs + tail / count + usize::from(extra)
            }
        };
        if self.cfg.drop_last {
            per_shard / self.cfg.batch_size
        } else {
            per_shard.div_ceil(self.cfg.batch_size)
        }
    }

    /// Starts the worker threads for one epoch. Batches `start_batch..num_batches()` are
    /// produced; an invalid configuration yields one error.
    pub fn epoch(&self, epoch: usize) -> EpochStream {
        self.epoch_from(epoch, self.cfg.start_batch)
    }

    /// Like [`Loader::epoch`], starting at batch `first_batch` of the epoch (resuming).
    pub fn epoch_from(&self, epoch: usize, first_batch: usize) -> EpochStream {
        if let Err(e) = self.cfg.check() {
            return EpochStream::failed(e);
        }
        let samples = self.epoch_samples(epoch);
        let batch_size = self.cfg.batch_size;
        let end = self.num_batches();
        let first = first_batch.min(end);
        let batches: Arc<Vec<Vec<usize>>> =
            Arc::new(samples.chunks(batch_size).take(end).map(<[usize]>::to_vec).collect());
        let workers = match self.cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min((end - first).max(1));
        let window = self.cfg.prefetch.max(1) + workers;
        let (job_tx, job_rx) = bounded::<usize>(window);
        let (result_tx, result_rx) = bounded(window);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..workers)
            .map(|w| {
                let ctx = WorkerCtx {
                    dataset: self.dataset.clone(),
                    transform: self.transform.clone(),
                    batches: batches.clone(),
                    epoch,
                    seed: self.cfg.seed,
                    on_bad_sample: self.cfg.on_bad_sample,
                    stop: stop.clone(),
                };
                let (jobs, results, stop_rx) = (job_rx.clone(), result_tx.clone(), stop_rx.clone());
                std::thread::Builder::new()
                    .name(format!("mlaan-data-{w}"))
                    .spawn(move || ctx.run(jobs, results, stop_rx))
            })
            .collect::<Result<Vec<_>, _>>();
        let threads = match threads {
            Ok(t) => t,
            Err(e) => {
                return EpochStream::failed(DataError::Loader(format!(
                    "cannot start worker thread: {e}"
                )))
            }
        };
        let mut stream = EpochStream {
            results: Some(result_rx),
            jobs: Some(job_tx),
            stop_tx: Some(stop_tx),
            stop,
            threads,
            ordered: self.cfg.ordered,
            next_issue: first,
            next_yield: first,
            end,
            pending: BTreeMap::new(),
            failed: None,
            done: false,
        };
        for _ in 0..window {
            stream.issue();
        }
        stream
    }
}

/// Everything a worker thread owns.
struct WorkerCtx {
    dataset: Arc<dyn Dataset>,
    transform: Transform,
    batches: Arc<Vec<Vec<usize>>>,
    epoch: usize,
    seed: u64,
    on_bad_sample: OnBadSample,
    stop: Arc<AtomicBool>,
}

type BatchResult = (usize, Result<Batch, DataError>);

impl WorkerCtx {
    fn run(self, jobs: Receiver<usize>, results: Sender<BatchResult>, stop: Receiver<()>) {
        loop {
            let b = select! {
                recv(jobs) -> job => match job { Ok(b) => b, Err(_) => return },
                recv(stop) -> _ => return,
            };
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let batch = self.build(b);
            if matches!(batch, Err(DataError::Cancelled)) || results.send((b, batch)).is_err() {
                return;
            }
        }
    }

    /// Reads and augments the samples of batch `b`, each written straight into the batch's
    /// buffer. A sample that fails — an error, or a panic inside a decoder or transform — is
    /// that sample's error; the worker goes on with the next.
    fn build(&self, b: usize) -> Result<Batch, DataError> {
        let ids = &self.batches[b];
        let mut batch = Batch {
            epoch: self.epoch,
            index: b,
            sample_ids: Vec::with_capacity(ids.len()),
            images: Vec::new(),
            shape: [0; 4],
            labels: Vec::with_capacity(ids.len()),
            skipped: 0,
        };
        let mut shape: Option<ImageShape> = None;
        for &i in ids {
            if self.stop.load(Ordering::Relaxed) {
                return Err(DataError::Cancelled);
            }
            let start = batch.images.len();
            match self.load(i, &mut batch.images, shape) {
                Ok((got, label)) => {
                    if shape.is_none() {
                        shape = Some(got);
                        batch.images.reserve((ids.len() - 1) * got.len());
                    }
                    batch.sample_ids.push(i);
                    batch.labels.push(i64::from(label));
                }
                Err(e) => {
                    batch.images.truncate(start);
                    match self.on_bad_sample {
                        OnBadSample::Stop => return Err(e),
                        OnBadSample::Skip => {
                            tracing::warn!(
                                epoch = self.epoch,
                                sample = i,
                                "skipping bad sample: {e}"
                            );
                            batch.skipped += 1;
                        }
                    }
                }
            }
        }
        if let Some(s) = shape {
            batch.shape = [batch.labels.len(), s.channels, s.height, s.width];
        }
        Ok(batch)
    }

    /// Appends sample `i`, augmented, to `images`; checks its shape against the batch's.
    fn load(
        &self,
        i: usize,
        images: &mut Vec<u8>,
        want: Option<ImageShape>,
    ) -> Result<(ImageShape, u32), DataError> {
        let mut rng = sample_rng(self.seed, self.epoch, i);
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.dataset.load_into(i, &self.transform, &mut rng, images)
        }));
        let (got, label) = match loaded {
            Ok(Ok(v)) => v,
            Ok(Err(DataError::Transform(e))) => return Err(self.sample_error(i, e)),
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                return Err(self.sample_error(i, format!("panicked while loading: {what}")));
            }
        };
        match want {
            Some(want) if want != got => {
                Err(self
                    .sample_error(i, format!("image shape {got} differs from the batch's {want}")))
            }
            _ => Ok((got, label)),
        }
    }

    /// Attaches the sample's identity to a failure that does not name a file.
    fn sample_error(&self, index: usize, reason: impl std::fmt::Display) -> DataError {
        DataError::Sample { dataset: self.dataset.describe(), index, reason: reason.to_string() }
    }
}

/// The batches of one epoch. Iterating blocks until the next batch is ready; dropping stops
/// and joins the workers.
pub struct EpochStream {
    results: Option<Receiver<BatchResult>>,
    jobs: Option<Sender<usize>>,
    /// Never sent on; dropping it wakes every worker waiting for a job.
    stop_tx: Option<Sender<()>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ordered: bool,
    next_issue: usize,
    next_yield: usize,
    end: usize,
    pending: BTreeMap<usize, Result<Batch, DataError>>,
    /// An error to yield once before ending (configuration errors).
    failed: Option<DataError>,
    done: bool,
}

impl EpochStream {
    fn failed(e: DataError) -> Self {
        EpochStream {
            results: None,
            jobs: None,
            stop_tx: None,
            stop: Arc::new(AtomicBool::new(true)),
            threads: Vec::new(),
            ordered: true,
            next_issue: 0,
            next_yield: 0,
            end: 0,
            pending: BTreeMap::new(),
            failed: Some(e),
            done: false,
        }
    }

    /// Hands the next batch number to the workers; closes the job channel after the last, so
    /// idle workers exit.
    fn issue(&mut self) {
        if self.next_issue < self.end {
            if let Some(jobs) = &self.jobs {
                // Cannot block: at most `window` batches are outstanding.
                let _ = jobs.send(self.next_issue);
            }
            self.next_issue += 1;
        }
        if self.next_issue >= self.end {
            self.jobs = None;
        }
    }

    /// Batches not yet yielded.
    pub fn remaining(&self) -> usize {
        self.end.saturating_sub(self.next_yield)
    }

    /// Stops the workers and joins them; reports a worker that panicked.
    fn shutdown(&mut self) -> Option<DataError> {
        self.stop.store(true, Ordering::Relaxed);
        self.stop_tx = None;
        self.jobs = None;
        self.results = None;
        let mut panicked = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                panicked = Some(DataError::Loader("a worker thread panicked".into()));
            }
        }
        panicked
    }

    fn finish_with(&mut self, item: Result<Batch, DataError>) -> Option<Result<Batch, DataError>> {
        if item.is_err() {
            self.done = true;
            self.shutdown();
        }
        Some(item)
    }
}

impl Iterator for EpochStream {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            self.done = true;
            return Some(Err(e));
        }
        if self.done || self.next_yield >= self.end {
            self.done = true;
            self.shutdown();
            return None;
        }
        loop {
            if self.ordered {
                if let Some(item) = self.pending.remove(&self.next_yield) {
                    self.next_yield += 1;
                    self.issue();
                    return self.finish_with(item);
                }
            }
            let received = self.results.as_ref().map(|r| r.recv());
            match received {
                Some(Ok((b, item))) => {
                    if self.ordered {
                        self.pending.insert(b, item);
                    } else {
                        self.next_yield += 1;
                        self.issue();
                        return self.finish_with(item);
                    }
                }
                // Every worker is gone before the epoch ended: one of them panicked.
                _ => {
                    self.done = true;
                    let err = self
                        .shutdown()
                        .unwrap_or_else(|| DataError::Loader("worker threads ended early".into()));
                    return Some(Err(err));
                }
            }
        }
    }
}

impl Drop for EpochStream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

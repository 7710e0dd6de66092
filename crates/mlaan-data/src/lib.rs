//! Dataset readers, augmentation and the parallel loader of mlaan-pipe.
//!
//! Everything here works on `u8` CHW images and plain `Vec`s so that the crate builds and
//! tests without libtorch; the trainer turns a [`Batch`] into a tensor at the edge and applies
//! the [`DatasetInfo`] normalisation there.
//!
//! * [`open`] reads a dataset named in the `[data]` config section (readers in [`readers`]),
//!   and resolves its augmentation and normalisation defaults ([`registry`]).
//! * [`Transform`] is the seeded augmentation pipeline.
//! * [`Loader`] decodes and augments batches on worker threads, deterministically in
//!   `(seed, epoch, sample)` whatever the number of threads.
//! * [`verify()`] reads every sample once and reports; [`fetch`](fetch()) downloads the public
//!   datasets with their published checksums.

pub mod bench;
pub mod error;
pub mod fetch;
pub mod image;
pub mod loader;
pub mod readers;
pub mod registry;
pub mod resample;
pub mod transform;
pub mod verify;

pub use bench::{measure_throughput, write_synthetic_imagefolder, ThroughputReport};
pub use error::DataError;
pub use fetch::{fetch, FetchOptions, FetchReport, RemoteFile};
pub use loader::{Batch, EpochStream, Loader, LoaderConfig, SampleRng};
pub use registry::{default_dir, info_without_files, open};
pub use transform::{Op, Transform};
pub use verify::{verify, VerifyReport};

use std::sync::Arc;

/// Size of one image, channels first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    pub fn new(channels: usize, height: usize, width: usize) -> Self {
        ImageShape { channels, height, width }
    }
    /// Bytes of one image of this shape.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// One decoded image (CHW, `u8`) and its class.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: Vec<u8>,
    pub shape: ImageShape,
    pub label: u32,
}

/// A labelled image collection. Implementations are shared by the loader threads, so `get`
/// takes `&self` and must be cheap to call concurrently.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn num_classes(&self) -> usize;
    /// Raw sample before augmentation; decoding errors name the file/record.
    fn get(&self, index: usize) -> Result<Sample, DataError>;
    /// Sample `index` with `transform` applied (its random choices drawn from `rng`),
    /// appended to `out` — the batch being filled — as CHW bytes; returns its shape and
    /// label. On an error `out` is left as it was. The default decodes the whole sample
    /// (`get`) and transforms it; image folders decode only the part of a JPEG the transform
    /// reads, with the same result.
    fn load_into(
        &self,
        index: usize,
        transform: &Transform,
        rng: &mut SampleRng,
        out: &mut Vec<u8>,
    ) -> Result<(ImageShape, u32), DataError> {
        let sample = self.get(index)?;
        let shape = transform.apply_into(&sample, rng, out)?;
        Ok((shape, sample.label))
    }
    /// The label of sample `index` without decoding it (histograms, class balance).
    /// Out-of-range indices return `u32::MAX`; `get` reports them as errors.
    fn label(&self, index: usize) -> u32;
    /// One line for logs, e.g. `Fashion-MNIST train: 60000 images 1x28x28, 10 classes (<dir>)`.
    fn describe(&self) -> String;
}

/// What the trainer needs to know about an opened dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetInfo {
    /// Canonical dataset name (`cifar10`, `fashion-mnist`, ...).
    pub name: String,
    pub num_classes: usize,
    pub channels: usize,
    /// Image shape after the training transform (what the model sees).
    pub train_shape: ImageShape,
    /// Image shape after the evaluation transform.
    pub eval_shape: ImageShape,
    /// Per-channel normalisation in `[0, 1]` units: `x = (pixel/255 - mean) / std`.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub class_names: Option<Vec<String>>,
}

impl DatasetInfo {
    /// What the networks are built for: the training shape and the classes.
    pub fn image(&self) -> mlaan_core::plan::ImageSpec {
        let s = self.train_shape;
        mlaan_core::plan::ImageSpec {
            channels: s.channels,
            size: [s.height, s.width],
            classes: self.num_classes,
        }
    }
}

/// An opened dataset: both splits, their transforms and the facts about them.
#[derive(Clone)]
pub struct Datasets {
    pub train: Arc<dyn Dataset>,
    pub test: Arc<dyn Dataset>,
    pub info: DatasetInfo,
    pub train_transform: Transform,
    pub eval_transform: Transform,
}

impl std::fmt::Debug for Datasets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datasets")
            .field("train", &self.train.describe())
            .field("test", &self.test.describe())
            .field("info", &self.info)
            .field("train_transform", &self.train_transform)
            .field("eval_transform", &self.eval_transform)
            .finish()
    }
}

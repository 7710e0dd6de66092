//! `[data]`: which dataset, where its files are, how it is decoded and normalised, and the
//! training augmentation (`[data.augment]`).

use super::{bad_value, is_positive};
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Pillow's `Image.MAX_IMAGE_PIXELS` doubled, above which Pillow refuses to open an image
/// (`DecompressionBombError`): the default of `data.max_image_pixels`.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// What to do with a sample that cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBadSample {
    Stop,
    Skip,
}

/// Border fill of the padded random crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PadMode {
    Zero,
    Reflect,
}

/// Training-time augmentation; `None` fields take the dataset's default (docs/method.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Turn all training augmentation off.
    pub disable: bool,
    pub crop_padding: Option<usize>,
    pub pad_mode: Option<PadMode>,
    pub flip: Option<bool>,
    /// Side of the random-resized / centre crop (ImageNet-style datasets).
    pub crop_size: Option<usize>,
    /// Side the evaluation image is resized to before the centre crop.
    pub eval_resize: Option<usize>,
}

/// The dataset and its loader (`[data]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `fashion-mnist`, `mnist`, `cifar10`, `cifar100`, `svhn`, `stl10`, `imagenet`,
    /// `imagefolder`, `synthetic`.
    pub dataset: String,
    /// Where the files are; `None` picks the dataset's default location.
    pub dir: Option<PathBuf>,
    /// Decoder threads; 0 = choose from the cores available.
    pub workers: usize,
    /// Batches decoded ahead of the trainer.
    pub prefetch: usize,
    pub augment: AugmentConfig,
    /// Per-channel mean and std in [0,1] units; `None` = dataset default.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub on_bad_sample: OnBadSample,
    /// Image folders: images of more pixels are refused before they are decoded (a
    /// decompression bomb is a bad sample). Default [`DEFAULT_MAX_IMAGE_PIXELS`].
    pub max_image_pixels: u64,
    /// Use only the first N training samples (quick experiments); 0 = all.
    pub train_limit: usize,
    /// Use only the first N test samples; 0 = all.
    pub test_limit: usize,
    /// SVHN: also train on `extra_32x32.mat`.
    pub svhn_extra: bool,
    /// CIFAR-100: `fine` (100 classes) or `coarse` (20 superclasses).
    pub cifar100_labels: String,
    /// Synthetic dataset: samples, classes, image side and channels.
    pub synthetic_samples: usize,
    pub synthetic_classes: usize,
    pub synthetic_size: usize,
    pub synthetic_channels: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "fashion-mnist".into(),
            dir: None,
            workers: 0,
            prefetch: 4,
            augment: AugmentConfig::default(),
            mean: None,
            std: None,
            on_bad_sample: OnBadSample::Stop,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            train_limit: 0,
            test_limit: 0,
            svhn_extra: false,
            cifar100_labels: "fine".into(),
            synthetic_samples: 2048,
            synthetic_classes: 10,
            synthetic_size: 32,
            synthetic_channels: 3,
        }
    }
}

impl DataConfig {
    /// CIFAR-100 label set known; `mean` and `std` of one length; every `std` entry > 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_image_pixels == 0 {
            return Err(bad_value("data.max_image_pixels", self.max_image_pixels, "must be > 0"));
        }
        if !["fine", "coarse"].contains(&self.cifar100_labels.as_str()) {
            return Err(bad_value("data.cifar100_labels", &self.cifar100_labels, "fine or coarse"));
        }
        if let (Some(mean), Some(std)) = (&self.mean, &self.std) {
            if mean.len() != std.len() {
                return Err(bad_value("data.std", std, "must have as many entries as data.mean"));
            }
        }
        if self.std.as_ref().is_some_and(|s| s.iter().any(|&x| !is_positive(f64::from(x)))) {
            return Err(bad_value("data.std", &self.std, "every entry must be > 0"));
        }
        Ok(())
    }
}

//! The dataset table: names, default locations, augmentation and normalisation defaults
//! (docs/method.md §5), and [`open`], which turns a `[data]` config section into [`Datasets`].

use crate::readers::folder::ImageFolder;
use crate::readers::synthetic::Synthetic;
use crate::readers::{cifar, idx, stl10, svhn, Head};
use crate::transform::{Op, Transform};
use crate::{DataError, Dataset, DatasetInfo, Datasets, ImageShape, Sample};
use mlaan_core::config::{AugmentConfig, DataConfig, PadMode};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where Debian's `dataset-fashion-mnist` package installs the (gzipped) IDX files.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// How a dataset's training crop is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropStyle {
    /// Fixed-size images: pad, random crop back to size (CIFAR, SVHN, STL-10, MNIST).
    Padded,
    /// Variable-size photographs: RandomResizedCrop for training, resize + centre crop for
    /// evaluation (ImageNet).
    Resized,
}

/// Static facts and defaults of one dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DatasetSpec {
    pub name: &'static str,
    pub title: &'static str,
    pub style: CropStyle,
    pub pad: usize,
    pub pad_mode: PadMode,
    pub flip: bool,
    pub crop_size: Option<usize>,
    pub eval_resize: Option<usize>,
    /// Per-channel mean/std in `[0, 1]` units; one value means "every channel".
    pub mean: &'static [f32],
    pub std: &'static [f32],
}

const fn padded(
    name: &'static str,
    title: &'static str,
    pad: usize,
    pad_mode: PadMode,
    flip: bool,
    mean: &'static [f32],
    std: &'static [f32],
) -> DatasetSpec {
    DatasetSpec {
        name,
        title,
        style: CropStyle::Padded,
        pad,
        pad_mode,
        flip,
        crop_size: None,
        eval_resize: None,
        mean,
        std,
    }
}

const fn resized(name: &'static str, title: &'static str) -> DatasetSpec {
    DatasetSpec {
        name,
        title,
        style: CropStyle::Resized,
        pad: 0,
        pad_mode: PadMode::Zero,
        flip: true,
        crop_size: Some(224),
        eval_resize: Some(256),
        mean: &[0.485, 0.456, 0.406],
        std: &[0.229, 0.224, 0.225],
    }
}

use PadMode::{Reflect, Zero};

/// Every dataset `open` knows, with its docs/method.md §5 defaults.
pub const DATASETS: &[DatasetSpec] = &[
    padded("fashion-mnist", "Fashion-MNIST", 2, Zero, true, &[0.2860], &[0.3530]),
    padded("mnist", "MNIST", 2, Zero, false, &[0.1307], &[0.3081]),
    padded(
        "cifar10",
        "CIFAR-10",
        4,
        Reflect,
        true,
        &[125.3 / 255.0, 123.0 / 255.0, 113.9 / 255.0],
        &[63.0 / 255.0, 62.1 / 255.0, 66.7 / 255.0],
    ),
    padded(
        "cifar100",
        "CIFAR-100",
        4,
        Reflect,
        true,
        &[0.5071, 0.4865, 0.4409],
        &[0.2673, 0.2564, 0.2762],
    ),
    padded("svhn", "SVHN", 2, Zero, false, &[0.4377, 0.4438, 0.4728], &[0.1980, 0.2010, 0.1970]),
    padded("stl10", "STL-10", 4, Zero, true, &[0.4467, 0.4398, 0.4066], &[0.2603, 0.2566, 0.2713]),
    resized("imagenet", "ImageNet"),
    resized("imagefolder", "ImageFolder"),
    padded("synthetic", "synthetic", 0, Zero, false, &[0.5], &[0.25]),
];

/// The table entry for `name`, or an error listing the known names.
pub fn spec(name: &str) -> Result<&'static DatasetSpec, DataError> {
    DATASETS.iter().find(|s| s.name == name).ok_or_else(|| {
        let known: Vec<&str> = DATASETS.iter().map(|s| s.name).collect();
        DataError::config(
            "dataset",
            format!("unknown dataset `{name}` (known: {})", known.join(", ")),
        )
    })
}

/// Where a dataset is looked for when `data.dir` is not set: Debian's Fashion-MNIST package
/// when installed, otherwise `$MLAAN_DATA_DIR/<name>`, otherwise `./data/<name>`.
pub fn default_dir(dataset: &str) -> PathBuf {
    if dataset == "fashion-mnist" && Path::new(DEBIAN_FASHION_MNIST).is_dir() {
        return PathBuf::from(DEBIAN_FASHION_MNIST);
    }
    match std::env::var_os("MLAAN_DATA_DIR") {
        Some(root) if !root.is_empty() => PathBuf::from(root).join(dataset),
        _ => PathBuf::from("data").join(dataset),
    }
}

/// The two splits as read, before limits and transforms.
struct Splits {
    train: Arc<dyn Dataset>,
    test: Arc<dyn Dataset>,
    /// Stored image shape; `None` for variable-size image folders.
    shape: Option<ImageShape>,
    class_names: Option<Vec<String>>,
}

fn read_splits(spec: &DatasetSpec, dir: &Path, cfg: &DataConfig) -> Result<Splits, DataError> {
    let title = |split: &str| format!("{} {split}", spec.title);
    let fixed = |train: crate::readers::ArrayDataset, test, names| Splits {
        shape: Some(train.shape()),
        train: Arc::new(train),
        test: Arc::new(test),
        class_names: names,
    };
    if spec.name != "synthetic" && !dir.is_dir() {
        return Err(DataError::NotFound {
            dataset: spec.name.into(),
            dir: dir.into(),
            reason: format!(
                "folder does not exist; set data.dir{}",
                if spec.name == "imagenet" || spec.name == "imagefolder" {
                    ""
                } else {
                    " or run `mlaan-pipe data fetch`"
                }
            ),
        });
    }
    Ok(match spec.name {
        "fashion-mnist" | "mnist" => {
            let names = (spec.name == "fashion-mnist").then(|| {
                [
                    "T-shirt/top",
                    "Trouser",
                    "Pullover",
                    "Dress",
                    "Coat",
                    "Sandal",
                    "Shirt",
                    "Sneaker",
                    "Bag",
                    "Ankle boot",
                ]
                .map(String::from)
                .to_vec()
            });
            fixed(
                idx::open(dir, "train", &title("train"), 10)?,
                idx::open(dir, "t10k", &title("test"), 10)?,
                names,
            )
        }
        "cifar10" => {
            let sub = "cifar-10-batches-bin";
            let train_files = [
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ];
            fixed(
                cifar::open(dir, sub, &train_files, cifar::CIFAR10, &title("train"))?,
                cifar::open(dir, sub, &["test_batch.bin"], cifar::CIFAR10, &title("test"))?,
                cifar::class_names(dir, sub, "test_batch.bin", "batches.meta.txt", 10),
            )
        }
        "cifar100" => {
            let (layout, names_file) = match cfg.cifar100_labels.as_str() {
                "fine" => (cifar::CIFAR100_FINE, "fine_label_names.txt"),
                "coarse" => (cifar::CIFAR100_COARSE, "coarse_label_names.txt"),
                other => {
                    return Err(DataError::config(
                        "cifar100_labels",
                        format!("`{other}` is neither `fine` nor `coarse`"),
                    ))
                }
            };
            let sub = "cifar-100-binary";
            fixed(
                cifar::open(dir, sub, &["train.bin"], layout, &title("train"))?,
                cifar::open(dir, sub, &["test.bin"], layout, &title("test"))?,
                cifar::class_names(dir, sub, "test.bin", names_file, layout.num_classes),
            )
        }
        "svhn" => {
            let train_files: &[&str] = if cfg.svhn_extra {
                &["train_32x32.mat", "extra_32x32.mat"]
            } else {
                &["train_32x32.mat"]
            };
            let digits = (0..10).map(|d| d.to_string()).collect();
            fixed(
                svhn::open(
                    dir,
                    train_files,
                    &title(if cfg.svhn_extra { "train+extra" } else { "train" }),
                )?,
                svhn::open(dir, &["test_32x32.mat"], &title("test"))?,
                Some(digits),
            )
        }
        "stl10" => fixed(
            stl10::open(dir, "train", &title("train"))?,
            stl10::open(dir, "test", &title("test"))?,
            stl10::class_names(dir),
        ),
        "imagenet" | "imagefolder" => {
            let train_dir = dir.join("train");
            let test_dir = ["val", "test"].map(|d| dir.join(d)).into_iter().find(|d| d.is_dir());
            let test_dir = test_dir.ok_or_else(|| DataError::NotFound {
                dataset: spec.name.into(),
                dir: dir.into(),
                reason: "no val/ (or test/) folder next to train/".into(),
            })?;
            if !train_dir.is_dir() {
                return Err(DataError::NotFound {
                    dataset: spec.name.into(),
                    dir: dir.into(),
                    reason: "no train/ folder".into(),
                });
            }
            let classes = ImageFolder::scan_classes(&train_dir)?;
            if cfg.max_image_pixels == 0 {
                return Err(DataError::config("max_image_pixels", "must be positive"));
            }
            let limit = cfg.max_image_pixels;
            let train = ImageFolder::open(&train_dir, &classes, &title("train"), limit)?;
            let test = ImageFolder::open(&test_dir, &classes, &title("val"), limit)?;
            Splits {
                train: Arc::new(train),
                test: Arc::new(test),
                shape: None,
                class_names: Some(classes),
            }
        }
        "synthetic" => {
            if cfg.synthetic_size == 0 || cfg.synthetic_channels == 0 || cfg.synthetic_classes == 0
            {
                return Err(DataError::config(
                    "synthetic_size",
                    "synthetic_size, synthetic_channels and synthetic_classes must be positive",
                ));
            }
            let shape =
                ImageShape::new(cfg.synthetic_channels, cfg.synthetic_size, cfg.synthetic_size);
            let n = cfg.synthetic_samples;
            let k = cfg.synthetic_classes;
            Splits {
                train: Arc::new(Synthetic::new(&title("train"), n, k, shape, 1)),
                test: Arc::new(Synthetic::new(&title("test"), (n / 4).max(k), k, shape, 2)),
                shape: Some(shape),
                class_names: None,
            }
        }
        other => {
            return Err(DataError::config("dataset", format!("`{other}` has no reader")));
        }
    })
}

/// The train and eval transforms from the dataset defaults overridden by `aug`.
pub fn resolve_transforms(
    spec: &DatasetSpec,
    aug: &AugmentConfig,
) -> Result<(Transform, Transform), DataError> {
    for (key, v) in [("augment.crop_size", aug.crop_size), ("augment.eval_resize", aug.eval_resize)]
    {
        if v == Some(0) {
            return Err(DataError::config(key, "must be positive"));
        }
    }
    if spec.style == CropStyle::Resized {
        for (key, set) in [
            ("augment.crop_padding", aug.crop_padding.is_some()),
            ("augment.pad_mode", aug.pad_mode.is_some()),
        ] {
            if set {
                return Err(DataError::config(
                    key,
                    format!("{} uses random-resized crops; padding does not apply", spec.name),
                ));
            }
        }
    }
    let crop_size = aug.crop_size.or(spec.crop_size);
    let eval_resize = aug.eval_resize.or(spec.eval_resize);
    let eval: Vec<Op> = eval_resize
        .map(|size| Op::ResizeShorter { size })
        .into_iter()
        .chain(crop_size.map(|size| Op::CenterCrop { size }))
        .collect();
    let flip = aug.flip.unwrap_or(spec.flip);
    let train = if aug.disable {
        eval.clone()
    } else {
        let crop = match spec.style {
            CropStyle::Padded => {
                let pad = aug.crop_padding.unwrap_or(spec.pad);
                (pad > 0 || crop_size.is_some()).then_some(Op::PadCrop {
                    pad,
                    mode: aug.pad_mode.unwrap_or(spec.pad_mode),
                    size: crop_size,
                })
            }
            CropStyle::Resized => Some(Op::RandomResizedCrop {
                size: crop_size.unwrap_or(224),
                scale: (0.08, 1.0),
                ratio: (3.0 / 4.0, 4.0 / 3.0),
            }),
        };
        crop.into_iter().chain(flip.then_some(Op::HFlip)).collect()
    };
    Ok((Transform::new(train), Transform::new(eval)))
}

/// Per-channel mean and std: the config's when given (checked against the channel count),
/// else the dataset's, broadcast when the table holds one value.
fn normalisation(
    spec: &DatasetSpec,
    cfg: &DataConfig,
    channels: usize,
) -> Result<(Vec<f32>, Vec<f32>), DataError> {
    let pick =
        |key: &str, given: &Option<Vec<f32>>, default: &[f32]| -> Result<Vec<f32>, DataError> {
            let v = match given {
                Some(v) if v.len() != channels => {
                    return Err(DataError::config(
                        key,
                        format!(
                            "has {} values but {} images have {channels} channel(s)",
                            v.len(),
                            spec.name
                        ),
                    ))
                }
                Some(v) => v.clone(),
                None if default.len() == 1 => vec![default[0]; channels],
                None => default.to_vec(),
            };
            if key == "std" && v.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
                return Err(DataError::config(key, format!("{v:?}: every std must be positive")));
            }
            Ok(v)
        };
    Ok((pick("mean", &cfg.mean, spec.mean)?, pick("std", &cfg.std, spec.std)?))
}

/// The stored image shape and class count a dataset's definition fixes, for when its files
/// are not at hand (`plan` on a machine without the data); `None` for an image folder, whose
/// classes are its sub-folders. ImageNet's photographs have no one size: its shape is what
/// the transforms make of them.
fn published(spec: &DatasetSpec, cfg: &DataConfig) -> Option<(Option<ImageShape>, usize)> {
    let gray = ImageShape::new(1, 28, 28);
    let rgb = |side| Some(ImageShape::new(3, side, side));
    Some(match spec.name {
        "fashion-mnist" | "mnist" => (Some(gray), 10),
        "cifar10" | "svhn" => (rgb(32), 10),
        "cifar100" if cfg.cifar100_labels == "coarse" => (rgb(32), 20),
        "cifar100" => (rgb(32), 100),
        "stl10" => (rgb(96), 10),
        "imagenet" => (None, 1000),
        "synthetic" => (
            Some(ImageShape::new(cfg.synthetic_channels, cfg.synthetic_size, cfg.synthetic_size)),
            cfg.synthetic_classes,
        ),
        _ => return None,
    })
}

/// What [`open`] would report about the dataset of `cfg`, from its definition alone, without
/// reading a file: for `plan` where the data is not (yet) on the machine. An image folder has
/// no definition (its classes are its folders), so that is an error naming why.
pub fn info_without_files(cfg: &DataConfig) -> Result<DatasetInfo, DataError> {
    let spec = spec(&cfg.dataset)?;
    let (shape, classes) = published(spec, cfg).ok_or_else(|| {
        DataError::config(
            "dataset",
            format!("{}'s classes are its folders: it cannot be described without them", spec.name),
        )
    })?;
    let (train_transform, eval_transform) = resolve_transforms(spec, &cfg.augment)?;
    describe(spec, cfg, shape, classes, None, &train_transform, &eval_transform)
}

/// The facts of a dataset whose stored images have `shape` (`None`: variable-size photographs)
/// once its transforms apply.
fn describe(
    spec: &DatasetSpec,
    cfg: &DataConfig,
    shape: Option<ImageShape>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
    train_transform: &Transform,
    eval_transform: &Transform,
) -> Result<DatasetInfo, DataError> {
    // Variable-size images: any input at least as large as the resize gives the final shape.
    let input = shape.unwrap_or_else(|| {
        let side = cfg
            .augment
            .eval_resize
            .or(spec.eval_resize)
            .unwrap_or(256)
            .max(cfg.augment.crop_size.unwrap_or(224));
        ImageShape::new(3, side, side)
    });
    let (mean, std) = normalisation(spec, cfg, input.channels)?;
    Ok(DatasetInfo {
        name: spec.name.into(),
        num_classes,
        channels: input.channels,
        train_shape: train_transform.output_shape(input),
        eval_shape: eval_transform.output_shape(input),
        mean,
        std,
        class_names,
    })
}

/// Opens the dataset named by `cfg.dataset` in `cfg.dir` (or its default dir), applies
/// `train_limit`/`test_limit`, and resolves the augmentation and normalisation defaults
/// overridden by `cfg`.
pub fn open(cfg: &DataConfig) -> Result<Datasets, DataError> {
    let spec = spec(&cfg.dataset)?;
    let dir = cfg.dir.clone().unwrap_or_else(|| default_dir(spec.name));
    let splits = read_splits(spec, &dir, cfg)?;
    let (train_transform, eval_transform) = resolve_transforms(spec, &cfg.augment)?;
    // A crop that cannot fit the stored images is a config error, found now rather than in
    // the first batch.
    if let Some(shape) = splits.shape {
        let probe = Sample { image: vec![0; shape.len()], shape, label: 0 };
        let mut rng = crate::loader::sample_rng(0, 0, 0);
        for t in [&train_transform, &eval_transform] {
            t.apply(&probe, &mut rng).map_err(|e| {
                DataError::config("augment", format!("{e} (images are {shape}, transform: {t})"))
            })?;
        }
    }
    let info = describe(
        spec,
        cfg,
        splits.shape,
        splits.train.num_classes(),
        splits.class_names,
        &train_transform,
        &eval_transform,
    )?;
    Ok(Datasets {
        train: Head::wrap(splits.train, cfg.train_limit),
        test: Head::wrap(splits.test, cfg.test_limit),
        info,
        train_transform,
        eval_transform,
    })
}

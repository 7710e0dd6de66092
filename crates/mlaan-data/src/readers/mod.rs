//! Readers for the published dataset layouts, and the two generic datasets they produce:
//! [`ArrayDataset`] (the whole split decoded into memory at open, used by every binary format)
//! and [`folder::ImageFolder`] (files decoded lazily in `get`).
//!
//! Every parser works on a byte slice plus the path it came from, so that it can be fuzzed
//! without files and its errors still name the file.

pub mod cifar;
pub mod folder;
pub mod idx;
pub mod mat5;
pub mod stl10;
pub mod svhn;
pub mod synthetic;

use crate::{DataError, Dataset, ImageShape, Sample, SampleRng, Transform};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A split held in memory as one contiguous CHW `u8` buffer.
pub struct ArrayDataset {
    title: String,
    source: PathBuf,
    shape: ImageShape,
    pixels: Vec<u8>,
    labels: Vec<u32>,
    num_classes: usize,
}

impl ArrayDataset {
    /// `pixels` holds `labels.len()` images of `shape`, CHW each; the readers guarantee it.
    pub(crate) fn new(
        title: impl Into<String>,
        source: impl Into<PathBuf>,
        shape: ImageShape,
        pixels: Vec<u8>,
        labels: Vec<u32>,
        num_classes: usize,
    ) -> Self {
        debug_assert_eq!(pixels.len(), labels.len() * shape.len());
        ArrayDataset {
            title: title.into(),
            source: source.into(),
            shape,
            pixels,
            labels,
            num_classes,
        }
    }
    pub fn shape(&self) -> ImageShape {
        self.shape
    }
    /// The image bytes of sample `index` without copying (tests, statistics).
    pub fn image(&self, index: usize) -> Option<&[u8]> {
        let n = self.shape.len();
        self.pixels.get(index * n..(index + 1) * n)
    }
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
}

impl std::fmt::Debug for ArrayDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Dataset for ArrayDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        match self.image(index) {
            Some(image) => {
                Ok(Sample { image: image.to_vec(), shape: self.shape, label: self.labels[index] })
            }
            None => Err(DataError::IndexOutOfRange {
                dataset: self.title.clone(),
                index,
                len: self.len(),
            }),
        }
    }
    fn label(&self, index: usize) -> u32 {
        self.labels.get(index).copied().unwrap_or(u32::MAX)
    }
    fn describe(&self) -> String {
        format!(
            "{}: {} images {}, {} classes ({})",
            self.title,
            self.len(),
            self.shape,
            self.num_classes,
            self.source.display()
        )
    }
}

/// The first `limit` samples of another dataset (`train_limit` / `test_limit`).
pub struct Head {
    inner: Arc<dyn Dataset>,
    limit: usize,
}

impl Head {
    /// Wraps `inner` only when the limit actually cuts it.
    pub fn wrap(inner: Arc<dyn Dataset>, limit: usize) -> Arc<dyn Dataset> {
        if limit == 0 || limit >= inner.len() {
            inner
        } else {
            Arc::new(Head { inner, limit })
        }
    }
}

impl Dataset for Head {
    fn len(&self) -> usize {
        self.limit
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index >= self.limit {
            return Err(DataError::IndexOutOfRange {
                dataset: self.inner.describe(),
                index,
                len: self.limit,
            });
        }
        self.inner.get(index)
    }
    fn load_into(
        &self,
        index: usize,
        transform: &Transform,
        rng: &mut SampleRng,
        out: &mut Vec<u8>,
    ) -> Result<(ImageShape, u32), DataError> {
        if index >= self.limit {
            return Err(DataError::IndexOutOfRange {
                dataset: self.inner.describe(),
                index,
                len: self.limit,
            });
        }
        self.inner.load_into(index, transform, rng, out)
    }
    fn label(&self, index: usize) -> u32 {
        if index < self.limit {
            self.inner.label(index)
        } else {
            u32::MAX
        }
    }
    fn describe(&self) -> String {
        format!("first {} of {}", self.limit, self.inner.describe())
    }
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Reads a file, inflating it when it starts with the gzip magic (IDX files ship either way).
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = read_file(path)?;
    gunzip_if_gz(raw, path)
}

pub(crate) fn gunzip_if_gz(raw: Vec<u8>, path: &Path) -> Result<Vec<u8>, DataError> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("bad gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The first of `names` that exists in `dir`, trying each also with `.gz` appended when
/// `gz` is set.
pub(crate) fn find_in(dir: &Path, names: &[&str], gz: bool) -> Option<PathBuf> {
    names.iter().find_map(|name| {
        let plain = dir.join(name);
        let zipped = dir.join(format!("{name}.gz"));
        if plain.is_file() {
            Some(plain)
        } else if gz && zipped.is_file() {
            Some(zipped)
        } else {
            None
        }
    })
}

/// Converts images stored with each channel plane column-major (MATLAB / STL-10 order: the
/// row index varies fastest) to row-major CHW. `src` holds whole images of `shape`.
pub(crate) fn transpose_planes(src: &[u8], shape: ImageShape, dst: &mut Vec<u8>) {
    let (h, w) = (shape.height, shape.width);
    let plane = h * w;
    dst.reserve(src.len());
    for p in src.chunks_exact(plane) {
        for y in 0..h {
            dst.extend((0..w).map(|x| p[x * h + y]));
        }
    }
}

/// Reads optional class names, one per non-empty line.
pub(crate) fn read_class_names(path: &Path, expected: usize) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let names: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    (names.len() == expected).then_some(names)
}

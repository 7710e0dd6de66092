//! CIFAR-10/100 binary version: fixed-size records of label byte(s) followed by 3072 bytes of
//! a 3x32x32 image, channels first (R plane, G plane, B plane, each row-major).

use super::{read_class_names, read_file, ArrayDataset};
use crate::{DataError, ImageShape};
use std::path::{Path, PathBuf};

pub const SHAPE: ImageShape = ImageShape { channels: 3, height: 32, width: 32 };

/// Which label of a record to use: CIFAR-10 has one label byte, CIFAR-100 two (coarse, fine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelLayout {
    pub label_bytes: usize,
    /// Which of the label bytes is the class.
    pub use_byte: usize,
    pub num_classes: usize,
}

pub const CIFAR10: LabelLayout = LabelLayout { label_bytes: 1, use_byte: 0, num_classes: 10 };
pub const CIFAR100_COARSE: LabelLayout =
    LabelLayout { label_bytes: 2, use_byte: 0, num_classes: 20 };
pub const CIFAR100_FINE: LabelLayout =
    LabelLayout { label_bytes: 2, use_byte: 1, num_classes: 100 };

/// Appends the records of one file to `pixels`/`labels`. A size that is not a whole number
/// of records, or a label out of range, is an error naming the record.
pub fn parse_records(
    bytes: &[u8],
    layout: LabelLayout,
    path: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<(), DataError> {
    let record = layout.label_bytes + SHAPE.len();
    if bytes.is_empty() {
        return Err(DataError::format(path, "empty file"));
    }
    if !bytes.len().is_multiple_of(record) {
        return Err(DataError::record(
            path,
            bytes.len() / record,
            format!(
                "truncated: file is {} bytes, not a whole number of {record}-byte records",
                bytes.len()
            ),
        ));
    }
    pixels.reserve(bytes.len() / record * SHAPE.len());
    for (i, r) in bytes.chunks_exact(record).enumerate() {
        let label = r[layout.use_byte];
        if label as usize >= layout.num_classes {
            return Err(DataError::record(
                path,
                i,
                format!("label {label} out of range 0..{}", layout.num_classes),
            ));
        }
        labels.push(u32::from(label));
        pixels.extend_from_slice(&r[layout.label_bytes..]);
    }
    Ok(())
}

/// Reads the given files of `dir` (or of `dir/<sub>` when that folder exists, the layout of the
/// extracted tarball) into one split.
pub fn open(
    dir: &Path,
    sub: &str,
    files: &[&str],
    layout: LabelLayout,
    title: &str,
) -> Result<ArrayDataset, DataError> {
    let root = base_dir(dir, sub, files[0]);
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for name in files {
        let path = root.join(name);
        if !path.is_file() {
            return Err(DataError::NotFound {
                dataset: title.into(),
                dir: dir.into(),
                reason: format!("missing {name} (expected in {sub}/ or directly in the folder)"),
            });
        }
        parse_records(&read_file(&path)?, layout, &path, &mut pixels, &mut labels)?;
    }
    Ok(ArrayDataset::new(title, root, SHAPE, pixels, labels, layout.num_classes))
}

/// `dir/sub` when it holds the files, else `dir` itself.
pub fn base_dir(dir: &Path, sub: &str, probe: &str) -> PathBuf {
    let nested = dir.join(sub);
    if nested.join(probe).is_file() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// Class names from the tarball's text file when present.
pub fn class_names(
    dir: &Path,
    sub: &str,
    probe: &str,
    file: &str,
    n: usize,
) -> Option<Vec<String>> {
    read_class_names(&base_dir(dir, sub, probe).join(file), n)
}

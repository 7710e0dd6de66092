//! STL-10 binary version (`stl10_binary/`): `*_X.bin` holds 3x96x96 images with every channel
//! plane stored column-major (MATLAB order), `*_y.bin` one byte per image, classes 1..10.

use super::{read_class_names, read_file, transpose_planes, ArrayDataset};
use crate::{DataError, ImageShape};
use std::path::{Path, PathBuf};

pub const SHAPE: ImageShape = ImageShape { channels: 3, height: 96, width: 96 };

/// Decodes the bytes of an `_X.bin` file into row-major CHW images, appending.
pub fn parse_images(bytes: &[u8], path: &Path, pixels: &mut Vec<u8>) -> Result<usize, DataError> {
    let n = SHAPE.len();
    if bytes.is_empty() || !bytes.len().is_multiple_of(n) {
        return Err(DataError::record(
            path,
            bytes.len() / n,
            format!(
                "truncated: file is {} bytes, not a whole number of {n}-byte images",
                bytes.len()
            ),
        ));
    }
    transpose_planes(bytes, SHAPE, pixels);
    Ok(bytes.len() / n)
}

/// Decodes the bytes of a `_y.bin` file (1..10) into labels 0..9.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u32>, DataError> {
    bytes
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if (1..=10).contains(&l) {
                Ok(u32::from(l - 1))
            } else {
                Err(DataError::record(path, i, format!("label {l} out of range 1..=10")))
            }
        })
        .collect()
}

/// The folder holding the binaries: `dir/stl10_binary` or `dir` itself.
pub fn base_dir(dir: &Path) -> PathBuf {
    let nested = dir.join("stl10_binary");
    if nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// Reads split `train` or `test`.
pub fn open(dir: &Path, split: &str, title: &str) -> Result<ArrayDataset, DataError> {
    let root = base_dir(dir);
    let xp = root.join(format!("{split}_X.bin"));
    let yp = root.join(format!("{split}_y.bin"));
    for p in [&xp, &yp] {
        if !p.is_file() {
            return Err(DataError::NotFound {
                dataset: title.into(),
                dir: dir.into(),
                reason: format!(
                    "missing stl10_binary/{}",
                    p.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
        }
    }
    let labels = parse_labels(&read_file(&yp)?, &yp)?;
    let mut pixels = Vec::new();
    let n = parse_images(&read_file(&xp)?, &xp, &mut pixels)?;
    if n != labels.len() {
        return Err(DataError::format(
            &yp,
            format!("{} labels but {} has {n} images", labels.len(), xp.display()),
        ));
    }
    Ok(ArrayDataset::new(title, root, SHAPE, pixels, labels, 10))
}

pub fn class_names(dir: &Path) -> Option<Vec<String>> {
    read_class_names(&base_dir(dir).join("class_names.txt"), 10)
}

//! SVHN cropped digits (`train_32x32.mat`, `test_32x32.mat`, `extra_32x32.mat`): MAT v5 files
//! with `X` (uint8, 32x32x3xN, column-major) and `y` (Nx1, label 10 meaning digit 0).

use super::mat5::{self, MatVar};
use super::{read_file, transpose_planes, ArrayDataset};
use crate::{DataError, ImageShape};
use std::path::Path;

pub const SHAPE: ImageShape = ImageShape { channels: 3, height: 32, width: 32 };

/// Decodes one SVHN `.mat` file's bytes into CHW pixels and labels 0..9, appending.
pub fn decode(
    bytes: &[u8],
    path: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<(), DataError> {
    let vars = mat5::parse(bytes, path)?;
    let find = |name: &str| -> Result<&MatVar, DataError> {
        vars.iter().find(|v| v.name == name).ok_or_else(|| {
            DataError::format(
                path,
                format!(
                    "no variable `{name}` (found: {})",
                    vars.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let x = find("X")?;
    if x.dims.len() != 4 || x.dims[..3] != [32, 32, 3] {
        return Err(DataError::format(
            path,
            format!("`X` has dimensions {:?}, expected 32x32x3xN", x.dims),
        ));
    }
    let y = find("y")?;
    let n = x.dims[3];
    let xs = x
        .data
        .as_ref()
        .and_then(|d| d.as_u8())
        .ok_or_else(|| DataError::format(path, "`X` is not stored as uint8"))?;
    let ys = y
        .data
        .as_ref()
        .map(|d| d.to_f64())
        .ok_or_else(|| DataError::format(path, "`y` is not numeric"))?;
    if ys.len() != n {
        return Err(DataError::format(
            path,
            format!("`y` has {} labels but `X` has {n} images", ys.len()),
        ));
    }
    labels.reserve(n);
    for (i, &v) in ys.iter().enumerate() {
        if !(1.0..=10.0).contains(&v) || v.fract() != 0.0 {
            return Err(DataError::record(path, i, format!("label {v} out of range 1..=10")));
        }
        labels.push(v as u32 % 10);
    }
    // Column-major 32x32x3xN: each image is contiguous, each channel plane column-major.
    transpose_planes(xs, SHAPE, pixels);
    Ok(())
}

/// Reads the named `.mat` files of `dir` into one split.
pub fn open(dir: &Path, files: &[&str], title: &str) -> Result<ArrayDataset, DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for name in files {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(DataError::NotFound {
                dataset: title.into(),
                dir: dir.into(),
                reason: format!("missing {name}"),
            });
        }
        decode(&read_file(&path)?, &path, &mut pixels, &mut labels)?;
    }
    Ok(ArrayDataset::new(title, dir, SHAPE, pixels, labels, 10))
}

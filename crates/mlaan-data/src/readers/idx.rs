//! IDX files (MNIST, Fashion-MNIST): a big-endian header `0 0 type ndims`, `ndims` u32
//! dimensions, then the data. Images are magic 2051 (`u8`, 3 dims), labels 2049 (`u8`, 1 dim).

use super::{find_in, read_maybe_gz, ArrayDataset};
use crate::{DataError, ImageShape};
use std::path::Path;

pub const IMAGES_MAGIC: u32 = 2051;
pub const LABELS_MAGIC: u32 = 2049;

/// A parsed IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray<'a> {
    pub dims: Vec<usize>,
    pub data: &'a [u8],
}

/// Parses an IDX file's bytes (already inflated), checking the magic, that the type is
/// `u8`, and that the size equals what the dimensions announce.
pub fn parse<'a>(
    bytes: &'a [u8],
    expected_magic: u32,
    path: &Path,
) -> Result<IdxArray<'a>, DataError> {
    let err = |reason: String| DataError::format(path, reason);
    let word = |i: usize| -> Option<u32> {
        bytes.get(4 * i..4 * i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magic =
        word(0).ok_or_else(|| err(format!("truncated: {} bytes, no IDX header", bytes.len())))?;
    if magic != expected_magic {
        return Err(err(format!(
            "bad IDX magic number {magic} (expected {expected_magic}: {})",
            if expected_magic == IMAGES_MAGIC { "u8 images, 3 dims" } else { "u8 labels, 1 dim" }
        )));
    }
    let ndims = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(ndims);
    for i in 0..ndims {
        let d = word(1 + i)
            .ok_or_else(|| err(format!("truncated inside the header (dimension {i})")))?;
        dims.push(d as usize);
    }
    let header = 4 + 4 * ndims;
    let want = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("dimensions {dims:?} overflow")))?;
    let have = bytes.len() - header;
    if have < want {
        return Err(err(format!(
            "truncated: dimensions {dims:?} need {want} data bytes, file has {have}"
        )));
    }
    if have > want {
        return Err(err(format!(
            "{} unexpected bytes after the {want} data bytes of dimensions {dims:?}",
            have - want
        )));
    }
    Ok(IdxArray { dims, data: &bytes[header..] })
}

/// Reads one split (`train` or `t10k`) of an MNIST-layout directory.
pub fn open(
    dir: &Path,
    prefix: &str,
    title: &str,
    num_classes: usize,
) -> Result<ArrayDataset, DataError> {
    let images_name = format!("{prefix}-images-idx3-ubyte");
    let labels_name = format!("{prefix}-labels-idx1-ubyte");
    let find = |name: &str| {
        find_in(dir, &[name, &name.replace("-idx", ".idx")], true).ok_or_else(|| {
            DataError::NotFound {
                dataset: title.into(),
                dir: dir.into(),
                reason: format!("missing {name} (or {name}.gz)"),
            }
        })
    };
    let images_path = find(&images_name)?;
    let labels_path = find(&labels_name)?;
    let image_bytes = read_maybe_gz(&images_path)?;
    let label_bytes = read_maybe_gz(&labels_path)?;
    let images = parse(&image_bytes, IMAGES_MAGIC, &images_path)?;
    let labels = parse(&label_bytes, LABELS_MAGIC, &labels_path)?;
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if labels.dims[0] != n {
        return Err(DataError::format(
            &labels_path,
            format!("{} labels but {} has {n} images", labels.dims[0], images_path.display()),
        ));
    }
    let labels: Vec<u32> = labels.data.iter().map(|&l| u32::from(l)).collect();
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= num_classes) {
        return Err(DataError::record(
            &labels_path,
            i,
            format!("label {l} out of range 0..{num_classes}"),
        ));
    }
    Ok(ArrayDataset::new(
        title,
        dir,
        ImageShape::new(1, h, w),
        images.data.to_vec(),
        labels,
        num_classes,
    ))
}

//! Writers of small files in each published format, for the tests.
#![allow(dead_code)]

use mlaan_data::readers::mat5::{self, MatClass, WriteVar};
use mlaan_data::ImageShape;
use std::io::Write;
use std::path::Path;

/// A deterministic CHW image whose every pixel differs from its neighbours.
pub fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((seed * 31 + j * 7 + j / 5) % 251) as u8).collect()
}

pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Writes an MNIST-layout split; returns the images (row-major, 1 channel) and labels.
pub fn write_idx_split(
    dir: &Path,
    prefix: &str,
    n: usize,
    h: usize,
    w: usize,
    zipped: bool,
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let images: Vec<Vec<u8>> = (0..n).map(|i| pattern(i + prefix.len(), h * w)).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i * 3 % 10) as u8).collect();
    let img = idx(2051, &[n as u32, h as u32, w as u32], &images.concat());
    let lab = idx(2049, &[n as u32], &labels);
    let (img, lab, ext) = if zipped { (gz(&img), gz(&lab), ".gz") } else { (img, lab, "") };
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte{ext}")), img).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")), lab).unwrap();
    (images, labels)
}

/// CIFAR records: label bytes then 3072 pixel bytes each.
pub fn cifar_file(labels: &[Vec<u8>], images: &[Vec<u8>]) -> Vec<u8> {
    labels.iter().zip(images).flat_map(|(l, i)| l.iter().chain(i).copied()).collect()
}

/// Column-major `X` of SVHN (32x32x3xN) from CHW images.
pub fn svhn_x(images: &[Vec<u8>]) -> Vec<u8> {
    let mut x = vec![0u8; images.len() * 3072];
    for (n, img) in images.iter().enumerate() {
        for ch in 0..3 {
            for r in 0..32 {
                for c in 0..32 {
                    x[r + 32 * c + 1024 * ch + 3072 * n] = img[ch * 1024 + r * 32 + c];
                }
            }
        }
    }
    x
}

/// An SVHN `.mat` file; labels are digits 0..9, stored as MATLAB does (0 → 10), `y` as
/// doubles (`y_u8`: double class stored as uint8, which MATLAB also does).
pub fn svhn_mat(images: &[Vec<u8>], digits: &[u32], compress: bool, y_u8: bool) -> Vec<u8> {
    let x = svhn_x(images);
    let n = images.len();
    let y: Vec<f64> = digits.iter().map(|&d| if d == 0 { 10.0 } else { d as f64 }).collect();
    let (y_storage, y_bytes): (u32, Vec<u8>) = if y_u8 {
        (mat5::storage::UINT8, y.iter().map(|&v| v as u8).collect())
    } else {
        (mat5::storage::DOUBLE, y.iter().flat_map(|v| v.to_le_bytes()).collect())
    };
    mat5::write(
        &[
            WriteVar {
                name: "X",
                class: MatClass::UInt8,
                dims: &[32, 32, 3, n],
                storage: mat5::storage::UINT8,
                data: &x,
            },
            WriteVar {
                name: "y",
                class: MatClass::Double,
                dims: &[n, 1],
                storage: y_storage,
                data: &y_bytes,
            },
        ],
        compress,
    )
}

/// STL-10 `_X.bin` bytes: each channel plane column-major.
pub fn stl_x(images: &[Vec<u8>]) -> Vec<u8> {
    let mut x = vec![0u8; images.len() * 27648];
    for (n, img) in images.iter().enumerate() {
        for ch in 0..3 {
            for r in 0..96 {
                for c in 0..96 {
                    x[n * 27648 + ch * 9216 + c * 96 + r] = img[ch * 9216 + r * 96 + c];
                }
            }
        }
    }
    x
}

pub fn jpeg(image: &[u8], shape: ImageShape) -> Vec<u8> {
    mlaan_data::image::encode_jpeg(image, shape, 100).unwrap()
}

/// A smooth image (JPEG-friendly, so decoded pixels stay close to the source).
pub fn smooth(shape: ImageShape, seed: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(shape.len());
    for c in 0..shape.channels {
        for y in 0..shape.height {
            for x in 0..shape.width {
                v.push(((seed * 40 + c * 60 + y * 3 + x * 2) % 200) as u8 + 20);
            }
        }
    }
    v
}

pub fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / a.len() as f64
}

//! Every binary parser on random and mutated inputs: errors are fine, panics are not.

mod common;

use mlaan_core::config::DEFAULT_MAX_IMAGE_PIXELS;
use mlaan_data::loader::sample_rng;
use mlaan_data::readers::{cifar, idx, mat5, stl10, svhn};
use mlaan_data::{image, ImageShape, Op, Transform};
use proptest::prelude::*;
use std::path::Path;

/// Applies byte overwrites and a truncation to a valid file.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    if !bytes.is_empty() {
        for &(pos, v) in edits {
            let i = pos % bytes.len();
            bytes[i] = v;
        }
    }
    if let Some(c) = cut {
        bytes.truncate(c % (bytes.len() + 1));
    }
    bytes
}

fn valid_idx() -> Vec<u8> {
    common::idx(2051, &[2, 3, 4], &[7; 24])
}

fn valid_mat(compress: bool) -> Vec<u8> {
    let imgs = vec![common::pattern(1, 3072), common::pattern(2, 3072)];
    common::svhn_mat(&imgs, &[3, 0], compress, false)
}

fn valid_jpeg() -> Vec<u8> {
    let shape = ImageShape::new(3, 16, 24);
    common::jpeg(&common::smooth(shape, 1), shape)
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>()), 0..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn idx_never_panics(random in prop::collection::vec(any::<u8>(), 0..64), e in edits(), cut in any::<Option<usize>>()) {
        let p = Path::new("f");
        let _ = idx::parse(&random, idx::IMAGES_MAGIC, p);
        let _ = idx::parse(&random, idx::LABELS_MAGIC, p);
        let m = mutate(valid_idx(), &e, cut);
        let _ = idx::parse(&m, idx::IMAGES_MAGIC, p);
    }

    #[test]
    fn cifar_never_panics(random in prop::collection::vec(any::<u8>(), 0..7000), e in edits(), cut in any::<Option<usize>>()) {
        let p = Path::new("f");
        for layout in [cifar::CIFAR10, cifar::CIFAR100_FINE, cifar::CIFAR100_COARSE] {
            let _ = cifar::parse_records(&random, layout, p, &mut Vec::new(), &mut Vec::new());
        }
        let good = common::cifar_file(&[vec![1], vec![2]], &[common::pattern(0, 3072), common::pattern(1, 3072)]);
        let _ = cifar::parse_records(&mutate(good, &e, cut), cifar::CIFAR10, p, &mut Vec::new(), &mut Vec::new());
    }

    #[test]
    fn mat5_never_panics(random in prop::collection::vec(any::<u8>(), 0..600), e in edits(), cut in any::<Option<usize>>(), compress in any::<bool>()) {
        let p = Path::new("f.mat");
        let _ = mat5::parse(&random, p);
        let mut with_header = valid_mat(false)[..128].to_vec();
        with_header.extend_from_slice(&random);
        let _ = svhn::decode(&with_header, p, &mut Vec::new(), &mut Vec::new());
        let m = mutate(valid_mat(compress), &e, cut);
        let _ = svhn::decode(&m, p, &mut Vec::new(), &mut Vec::new());
    }

    #[test]
    fn stl10_never_panics(random in prop::collection::vec(any::<u8>(), 0..30000)) {
        let p = Path::new("f");
        let _ = stl10::parse_images(&random, p, &mut Vec::new());
        let _ = stl10::parse_labels(&random, p);
    }

    #[test]
    fn jpeg_never_panics(random in prop::collection::vec(any::<u8>(), 0..512), e in edits(), cut in any::<Option<usize>>()) {
        let p = Path::new("f.jpg");
        let _ = image::decode(&random, p, DEFAULT_MAX_IMAGE_PIXELS);
        let mut soi = vec![0xff, 0xd8, 0xff];
        soi.extend_from_slice(&random);
        let _ = image::decode(&soi, p, DEFAULT_MAX_IMAGE_PIXELS);
        let mutated = mutate(valid_jpeg(), &e, cut);
        let _ = image::decode(&mutated, p, DEFAULT_MAX_IMAGE_PIXELS);
        // The crop-aware path (header, region, resample) on the same bytes.
        let train = Transform::new(vec![
            Op::RandomResizedCrop { size: 8, scale: (0.08, 1.0), ratio: (0.75, 4.0 / 3.0) },
            Op::HFlip,
        ]);
        let eval = Transform::new(vec![Op::ResizeShorter { size: 10 }, Op::CenterCrop { size: 8 }]);
        for t in [&train, &eval] {
            let mut out = vec![1, 2, 3];
            match image::decode_transformed(&mutated, p, DEFAULT_MAX_IMAGE_PIXELS, t, &mut sample_rng(0, 0, 0), &mut out) {
                Ok(shape) => prop_assert_eq!(out.len(), 3 + shape.len()),
                Err(_) => prop_assert_eq!(&out, &[1, 2, 3]),
            }
        }
    }
}

#[test]
fn mutated_valid_files_still_parse_when_untouched() {
    let p = Path::new("f");
    assert!(idx::parse(&valid_idx(), idx::IMAGES_MAGIC, p).is_ok());
    for c in [true, false] {
        assert!(svhn::decode(&valid_mat(c), p, &mut Vec::new(), &mut Vec::new()).is_ok());
    }
    assert!(image::decode(&valid_jpeg(), p, DEFAULT_MAX_IMAGE_PIXELS).is_ok());
}

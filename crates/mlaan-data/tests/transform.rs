//! Augmentation against hand-computed examples.

use mlaan_core::config::PadMode;
use mlaan_data::loader::sample_rng;
use mlaan_data::{ImageShape, Op, Sample, Transform};
use std::collections::BTreeSet;

fn sample(shape: ImageShape, image: Vec<u8>) -> Sample {
    Sample { image, shape, label: 0 }
}

/// All 3x3 windows of a 5x5 padded image written out by hand.
fn windows(padded: [[u8; 5]; 5]) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    for t in 0..3 {
        for l in 0..3 {
            out.insert((0..3).flat_map(|y| (0..3).map(move |x| padded[t + y][l + x])).collect());
        }
    }
    out
}

fn outputs(t: &Transform, s: &Sample, runs: u64) -> BTreeSet<Vec<u8>> {
    (0..runs).map(|i| t.apply(s, &mut sample_rng(i, 0, 0)).unwrap().0).collect()
}

#[test]
fn padded_crop_matches_hand_computed_windows() {
    let s = sample(ImageShape::new(1, 3, 3), (1..=9).collect());
    let zero = Transform::new(vec![Op::PadCrop { pad: 1, mode: PadMode::Zero, size: None }]);
    let zero_padded =
        [[0, 0, 0, 0, 0], [0, 1, 2, 3, 0], [0, 4, 5, 6, 0], [0, 7, 8, 9, 0], [0, 0, 0, 0, 0]];
    let got = outputs(&zero, &s, 300);
    assert_eq!(got, windows(zero_padded), "every window, and only those, appears");
    assert!(got.contains(&vec![0, 0, 0, 0, 1, 2, 0, 4, 5]));
    let reflect = Transform::new(vec![Op::PadCrop { pad: 1, mode: PadMode::Reflect, size: None }]);
    let reflect_padded =
        [[5, 4, 5, 6, 5], [2, 1, 2, 3, 2], [5, 4, 5, 6, 5], [8, 7, 8, 9, 8], [5, 4, 5, 6, 5]];
    let got = outputs(&reflect, &s, 300);
    assert_eq!(got, windows(reflect_padded));
    assert!(got.contains(&vec![5, 6, 5, 8, 9, 8, 5, 6, 5]));
}

#[test]
fn padded_crop_applies_to_every_channel_alike() {
    let shape = ImageShape::new(2, 4, 4);
    let img: Vec<u8> = (0..32).collect();
    let t = Transform::new(vec![Op::PadCrop { pad: 2, mode: PadMode::Reflect, size: None }]);
    for seed in 0..20 {
        let (out, s) = t.apply(&sample(shape, img.clone()), &mut sample_rng(seed, 1, 2)).unwrap();
        assert_eq!(s, shape);
        // Channel 1 is channel 0 plus 16 everywhere.
        assert!(out[..16].iter().zip(&out[16..]).all(|(a, b)| b - a == 16));
    }
}

#[test]
fn flip_mirrors_rows_half_the_time() {
    let s = sample(ImageShape::new(1, 2, 3), vec![1, 2, 3, 4, 5, 6]);
    let got = outputs(&Transform::new(vec![Op::HFlip]), &s, 64);
    assert_eq!(got, [vec![1, 2, 3, 4, 5, 6], vec![3, 2, 1, 6, 5, 4]].into_iter().collect());
}

#[test]
fn random_resized_crop_gives_the_requested_shape() {
    let shape = ImageShape::new(3, 50, 70);
    let img: Vec<u8> = (0..shape.len()).map(|i| (i % 256) as u8).collect();
    let t = Transform::new(vec![
        Op::RandomResizedCrop { size: 24, scale: (0.08, 1.0), ratio: (0.75, 4.0 / 3.0) },
        Op::HFlip,
    ]);
    assert_eq!(t.output_shape(shape), ImageShape::new(3, 24, 24));
    let mut distinct = BTreeSet::new();
    for seed in 0..30 {
        let (out, s) = t.apply(&sample(shape, img.clone()), &mut sample_rng(seed, 0, 0)).unwrap();
        assert_eq!((s, out.len()), (ImageShape::new(3, 24, 24), 3 * 24 * 24));
        distinct.insert(out);
    }
    assert!(distinct.len() > 25, "crops vary with the seed");
}

#[test]
fn eval_resize_then_centre_crop() {
    let shape = ImageShape::new(3, 375, 500);
    let t = Transform::new(vec![Op::ResizeShorter { size: 256 }, Op::CenterCrop { size: 224 }]);
    assert_eq!(
        Transform::new(vec![Op::ResizeShorter { size: 256 }]).output_shape(shape),
        ImageShape::new(3, 256, 341)
    );
    assert_eq!(t.output_shape(shape), ImageShape::new(3, 224, 224));
    let img = vec![77u8; shape.len()];
    let (out, s) = t.apply(&sample(shape, img), &mut sample_rng(0, 0, 0)).unwrap();
    assert_eq!(s, ImageShape::new(3, 224, 224));
    assert!(out.iter().all(|&p| p == 77), "a constant image stays constant");
}

#[test]
fn resize_is_bilinear_when_enlarging_and_averages_when_shrinking() {
    let up = Transform::new(vec![Op::ResizeShorter { size: 2 }]);
    let (out, s) = up
        .apply(&sample(ImageShape::new(1, 1, 2), vec![0, 100]), &mut sample_rng(0, 0, 0))
        .unwrap();
    assert_eq!(s, ImageShape::new(1, 2, 4));
    assert_eq!(out, [0, 25, 75, 100, 0, 25, 75, 100]);
    // Halving widens the triangle to two source pixels (PIL's antialiased bilinear): output 0
    // is centred on source x=1.0 and weighs pixels 0,1,2 by .75,.75,.25 (normalised):
    // (0*.75 + 100*.75 + 200*.25) / 1.75 = 71.4; output 1: (100*.25 + 200*.75 + 40*.75) / 1.75.
    let down = Transform::new(vec![Op::ResizeShorter { size: 1 }]);
    let (out, _) = down
        .apply(
            &sample(ImageShape::new(1, 2, 4), vec![0, 100, 200, 40, 0, 100, 200, 40]),
            &mut sample_rng(0, 0, 0),
        )
        .unwrap();
    assert_eq!(out, [71, 117]);
}

#[test]
fn centre_crop_pads_small_images_with_zeros() {
    let t = Transform::new(vec![Op::CenterCrop { size: 4 }]);
    let (out, _) = t
        .apply(&sample(ImageShape::new(1, 2, 2), vec![1, 2, 3, 4]), &mut sample_rng(0, 0, 0))
        .unwrap();
    assert_eq!(out, [0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 0, 0, 0, 0, 0]);
    let t = Transform::new(vec![Op::CenterCrop { size: 2 }]);
    let (out, _) = t
        .apply(&sample(ImageShape::new(1, 4, 4), (0..16).collect()), &mut sample_rng(0, 0, 0))
        .unwrap();
    assert_eq!(out, [5, 6, 9, 10]);
}

#[test]
fn same_seed_same_output() {
    let shape = ImageShape::new(3, 32, 32);
    let img: Vec<u8> = (0..shape.len()).map(|i| (i * 13 % 256) as u8).collect();
    let t =
        Transform::new(vec![Op::PadCrop { pad: 4, mode: PadMode::Reflect, size: None }, Op::HFlip]);
    let s = sample(shape, img);
    let a = t.apply(&s, &mut sample_rng(7, 1, 3)).unwrap();
    let b = t.apply(&s, &mut sample_rng(7, 1, 3)).unwrap();
    assert_eq!(a, b);
    let others = (0..8).filter(|&e| t.apply(&s, &mut sample_rng(7, e, 3)).unwrap() != a).count();
    assert!(others >= 6, "other epochs give other crops");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let t = Transform::new(vec![Op::HFlip]);
    let wrong_len = sample(ImageShape::new(3, 4, 4), vec![0; 10]);
    assert!(t.apply(&wrong_len, &mut sample_rng(0, 0, 0)).is_err());
    let empty = sample(ImageShape::new(3, 0, 4), vec![]);
    assert!(t.apply(&empty, &mut sample_rng(0, 0, 0)).is_err());
    assert!(Transform::identity().apply(&empty, &mut sample_rng(0, 0, 0)).is_ok());
    assert_eq!(format!("{t}"), "h-flip");
}

#[test]
fn fused_resize_and_centre_crop_equal_the_two_steps() {
    for (h, w) in [(375, 500), (300, 200), (257, 256), (100, 90)] {
        let shape = ImageShape::new(3, h, w);
        let img: Vec<u8> = (0..shape.len()).map(|i| ((i * 7 + i / 13) % 256) as u8).collect();
        let s = sample(shape, img);
        let mut rng = sample_rng(0, 0, 0);
        let fused =
            Transform::new(vec![Op::ResizeShorter { size: 128 }, Op::CenterCrop { size: 112 }]);
        let resized =
            Transform::new(vec![Op::ResizeShorter { size: 128 }]).apply(&s, &mut rng).unwrap();
        let two_steps = Transform::new(vec![Op::CenterCrop { size: 112 }])
            .apply(&sample(resized.1, resized.0), &mut rng)
            .unwrap();
        assert_eq!(fused.apply(&s, &mut rng).unwrap(), two_steps, "{h}x{w}");
    }
}

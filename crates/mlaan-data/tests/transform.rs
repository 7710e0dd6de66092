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

/// torchvision's `RandomResizedCrop.get_params`, transcribed from its source (ten tries of a
/// uniform area fraction and a log-uniform aspect ratio, `round` to whole pixels, accepted
/// when it fits; else the whole image clamped to the ratio range, centred), drawing from an
/// RNG of its own: (top, left, height, width).
fn torchvision_get_params(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl rand::Rng,
) -> Box4 {
    let area = (h * w) as f64;
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..scale.1);
        let aspect = rng.random_range(ratio.0.ln()..ratio.1.ln()).exp();
        let cw = (target * aspect).sqrt().round() as i64;
        let ch = (target / aspect).sqrt().round() as i64;
        if 0 < cw && cw <= w as i64 && 0 < ch && ch <= h as i64 {
            let i = rng.random_range(0..=h - ch as usize);
            let j = rng.random_range(0..=w - cw as usize);
            return (i, j, ch as usize, cw as usize);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w as f64 / ratio.0).round() as usize)
    } else if in_ratio > ratio.1 {
        ((h as f64 * ratio.1).round() as usize, h)
    } else {
        (w, h)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// A crop box: (top, left, height, width).
type Box4 = (usize, usize, usize, usize);

/// A statistic of a box in an image of (height, width).
type BoxStat = fn(&Box4, usize, usize) -> f64;

/// Two-sample Kolmogorov-Smirnov statistic.
fn ks(mut a: Vec<f64>, mut b: Vec<f64>) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

#[test]
fn random_resized_crop_samples_boxes_as_torchvision_does() {
    use rand::SeedableRng;
    let (scale, ratio) = ((0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0));
    let t = Transform::new(vec![Op::RandomResizedCrop { size: 224, scale, ratio }]);
    let n = 20_000;
    // KS critical value for two samples of n at a 0.001 significance level.
    let critical = 1.95 * (2.0 / n as f64).sqrt();
    for (h, w) in [(375, 500), (500, 333), (120, 900), (224, 224)] {
        let ours: Vec<Box4> = (0..n)
            .map(|i| {
                let r = t.resample_for(h, w, &mut sample_rng(1, 0, i)).unwrap();
                (r.window.y, r.window.x, r.window.h, r.window.w)
            })
            .collect();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(99);
        let theirs: Vec<_> =
            (0..n).map(|_| torchvision_get_params(h, w, scale, ratio, &mut rng)).collect();
        let stats: [(&str, BoxStat); 4] = [
            ("area fraction", |b, h, w| (b.2 * b.3) as f64 / (h * w) as f64),
            ("log aspect ratio", |b, _, _| (b.3 as f64 / b.2 as f64).ln()),
            ("centre row", |b, h, _| (b.0 as f64 + b.2 as f64 / 2.0) / h as f64),
            ("centre column", |b, _, w| (b.1 as f64 + b.3 as f64 / 2.0) / w as f64),
        ];
        for (name, f) in stats {
            let d = ks(
                ours.iter().map(|b| f(b, h, w)).collect(),
                theirs.iter().map(|b| f(b, h, w)).collect(),
            );
            assert!(d < critical, "{h}x{w} {name}: KS distance {d:.4} >= {critical:.4}");
        }
        // Every accepted box keeps the rules: inside the image, area and ratio in range (up
        // to rounding to whole pixels).
        for b in &ours {
            assert!(b.0 + b.2 <= h && b.1 + b.3 <= w && b.2 > 0 && b.3 > 0);
        }
    }
    // A uniform instead of log-uniform ratio would be caught: the statistic sees it.
    let uniform: Vec<f64> = {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        (0..n).map(|_| rand::Rng::random_range(&mut rng, ratio.0..ratio.1).ln()).collect()
    };
    let log_uniform: Vec<f64> = {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(6);
        (0..n).map(|_| rand::Rng::random_range(&mut rng, ratio.0.ln()..ratio.1.ln())).collect()
    };
    assert!(ks(uniform, log_uniform) > critical);
}

#[test]
fn random_resized_crop_falls_back_to_the_centred_ratio_clamped_image() {
    // Areas of at least 90% never fit a 100-pixel-high strip: all ten tries fail.
    let t = Transform::new(vec![Op::RandomResizedCrop {
        size: 32,
        scale: (0.9, 1.0),
        ratio: (3.0 / 4.0, 4.0 / 3.0),
    }]);
    for seed in 0..20 {
        let wide = t.resample_for(100, 1000, &mut sample_rng(seed, 0, 0)).unwrap().window;
        assert_eq!((wide.y, wide.x, wide.h, wide.w), (0, 433, 100, 133));
        let tall = t.resample_for(1000, 100, &mut sample_rng(seed, 0, 0)).unwrap().window;
        assert_eq!((tall.y, tall.x, tall.h, tall.w), (433, 0, 133, 100));
    }
}

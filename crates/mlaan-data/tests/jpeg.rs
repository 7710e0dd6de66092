//! The image-folder decoder: crop-aware JPEG decoding against a full decode followed by the
//! same transform, and every kind of file an ImageNet folder holds (baseline, progressive,
//! greyscale, CMYK, EXIF-rotated, PNG named `.JPEG`, truncated, corrupt, oversized).

mod common;

use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
use mlaan_core::config::{DataConfig, OnBadSample, DEFAULT_MAX_IMAGE_PIXELS};
use mlaan_data::image::{cmyk_to_rgb, decode, decode_transformed};
use mlaan_data::loader::sample_rng;
use mlaan_data::{open, Datasets, ImageShape, Loader, LoaderConfig, Op, Transform};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// A photo-like interleaved image: oriented gratings, hard-edged blocks and noise, so that
/// JPEG blocks have real high-frequency content and any misplaced pixel shows.
fn photo(w: usize, h: usize, channels: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (fx, fy) = (rng.random_range(0.02..0.2), rng.random_range(0.02..0.2));
    let block = rng.random_range(9..40);
    let mut out = Vec::with_capacity(w * h * channels);
    for y in 0..h {
        for x in 0..w {
            let edge = if (x / block + y / block) % 2 == 0 { 40.0 } else { -40.0 };
            for c in 0..channels {
                let wave = 60.0 * ((x as f64 * fx + y as f64 * fy) * (1.0 + c as f64 * 0.3)).sin();
                let noise = rng.random_range(-25.0..25.0);
                out.push((128.0 + wave + edge + noise).clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

fn encode(
    pixels: &[u8],
    (w, h): (usize, usize),
    color: ColorType,
    sampling: SamplingFactor,
    progressive: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out, 90);
    e.set_sampling_factor(sampling);
    e.set_progressive(progressive);
    e.encode(pixels, w as u16, h as u16, color).unwrap();
    out
}

fn rgb_jpeg(w: usize, h: usize, sampling: SamplingFactor, progressive: bool, seed: u64) -> Vec<u8> {
    encode(&photo(w, h, 3, seed), (w, h), ColorType::Rgb, sampling, progressive)
}

/// An image folder whose train and val splits both hold `files` in class `a`.
fn folder(
    files: &[(&str, Vec<u8>)],
    cfg: impl FnOnce(&mut DataConfig),
) -> (tempfile::TempDir, Datasets) {
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "val"] {
        let d = dir.path().join(split).join("a");
        std::fs::create_dir_all(&d).unwrap();
        for (name, bytes) in files {
            std::fs::write(d.join(name), bytes).unwrap();
        }
    }
    let mut c = DataConfig {
        dataset: "imagenet".into(),
        dir: Some(dir.path().into()),
        ..DataConfig::default()
    };
    cfg(&mut c);
    let ds = open(&c).unwrap();
    (dir, ds)
}

fn rrc(size: usize, scale: (f64, f64)) -> Transform {
    Transform::new(vec![
        Op::RandomResizedCrop { size, scale, ratio: (3.0 / 4.0, 4.0 / 3.0) },
        Op::HFlip,
    ])
}

fn eval(resize: usize, crop: usize) -> Transform {
    Transform::new(vec![Op::ResizeShorter { size: resize }, Op::CenterCrop { size: crop }])
}

/// (crop-aware result, full decode + transform) for sample `i` drawn with `seed`.
fn both(ds: &Datasets, i: usize, t: &Transform, seed: u64) -> (Vec<u8>, Vec<u8>, ImageShape) {
    let mut fused = Vec::new();
    let (shape, _) = ds.train.load_into(i, t, &mut sample_rng(seed, 0, i), &mut fused).unwrap();
    let sample = ds.train.get(i).unwrap();
    let (reference, ref_shape) = t.apply(&sample, &mut sample_rng(seed, 0, i)).unwrap();
    assert_eq!(shape, ref_shape);
    (fused, reference, shape)
}

#[test]
fn crop_aware_decode_equals_full_decode_where_no_dct_scaling_applies() {
    use SamplingFactor::{F_1_1, F_2_1, F_2_2};
    let grey = encode(&photo(411, 299, 1, 4), (411, 299), ColorType::Luma, F_1_1, false);
    let cmyk = encode(&photo(320, 250, 4, 5), (320, 250), ColorType::Cmyk, F_2_2, false);
    let files = [
        ("a_420.JPEG", rgb_jpeg(500, 375, F_2_2, false, 1)),
        ("b_422.JPEG", rgb_jpeg(375, 500, F_2_1, false, 2)),
        ("c_444_progressive.JPEG", rgb_jpeg(517, 333, F_1_1, true, 3)),
        ("d_420_progressive.JPEG", rgb_jpeg(500, 333, F_2_2, true, 6)),
        ("e_grey.JPEG", grey),
        ("f_cmyk.JPEG", cmyk),
    ];
    let (_dir, ds) = folder(&files, |_| {});
    let (mut partial_rows, mut partial_cols) = (0, 0);
    assert_eq!(ds.train.len(), files.len());
    for (i, (name, _)) in files.iter().enumerate() {
        let s = ds.train.get(i).unwrap().shape;
        for t in [rrc(224, (0.08, 1.0)), eval(256, 224), rrc(96, (0.08, 1.0))] {
            for seed in 0..30 {
                let r = t.resample_for(s.height, s.width, &mut sample_rng(seed, 0, i)).unwrap();
                if r.dct_reduction() > 1 {
                    continue;
                }
                let reads = r.reads();
                partial_cols += usize::from(reads.x > 0 && reads.x + reads.w < s.width);
                partial_rows += usize::from(reads.y > 0 && reads.y + reads.h < s.height);
                let (fused, reference, shape) = both(&ds, i, &t, seed);
                assert_eq!(shape.channels, 3);
                assert!(
                    fused == reference,
                    "{name} with {t}, seed {seed}: crop-aware decode differs from the full \
                     decode (mean |diff| {:.3})",
                    common::mean_abs_diff(&fused, &reference)
                );
            }
        }
    }
    // The comparison exercised regions cut on all four sides, not only whole images.
    assert!(partial_cols > 100 && partial_rows > 100, "{partial_cols} {partial_rows}");
}

#[test]
fn dct_scaled_decode_is_close_to_full_decode() {
    let files = [
        ("big_420.JPEG", rgb_jpeg(1600, 1200, SamplingFactor::F_2_2, false, 7)),
        ("big_progressive.JPEG", rgb_jpeg(1200, 1500, SamplingFactor::F_2_2, true, 8)),
    ];
    let (_dir, ds) = folder(&files, |_| {});
    let mut reductions = std::collections::BTreeSet::new();
    for (i, (name, _)) in files.iter().enumerate() {
        let s = ds.train.get(i).unwrap().shape;
        for t in [rrc(224, (0.3, 1.0)), eval(256, 224)] {
            for seed in 0..12 {
                let r = t.resample_for(s.height, s.width, &mut sample_rng(seed, 0, i)).unwrap();
                reductions.insert(r.dct_reduction());
                let (fused, reference, _) = both(&ds, i, &t, seed);
                let mad = common::mean_abs_diff(&fused, &reference);
                // Both are low-pass versions of the same pixels: the DCT reduction averages
                // d x d blocks where the bilinear filter weights them; on this high-contrast
                // texture they differ by a few levels on average.
                assert!(mad < 4.0, "{name} with {t}, seed {seed}: mean |diff| {mad:.2}");
            }
        }
    }
    assert!(reductions.contains(&2) && reductions.contains(&4), "{reductions:?}");
}

#[test]
fn greyscale_is_replicated_and_cmyk_converted_as_pillow_does() {
    let grey =
        encode(&photo(64, 48, 1, 9), (64, 48), ColorType::Luma, SamplingFactor::F_1_1, false);
    let (rgb, shape) = decode(&grey, Path::new("g.JPEG"), DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(shape, ImageShape::new(3, 48, 64));
    let plane = 48 * 64;
    assert!(rgb[..plane] == rgb[plane..2 * plane] && rgb[..plane] == rgb[2 * plane..]);

    // Flat CMYK patches (JPEG keeps flat colour nearly exactly); jpeg-encoder stores CMYK
    // inverted with an Adobe marker, as Photoshop does.
    let inks =
        [[0u8, 0, 0, 0], [255, 0, 0, 0], [0, 128, 255, 0], [30, 60, 90, 120], [0, 0, 0, 255]];
    let (w, h) = (16 * inks.len(), 16);
    let mut cmyk = Vec::new();
    for _ in 0..h {
        for x in 0..w {
            cmyk.extend_from_slice(&inks[x / 16]);
        }
    }
    let file = encode(&cmyk, (w, h), ColorType::Cmyk, SamplingFactor::F_1_1, false);
    let (rgb, shape) = decode(&file, Path::new("cmyk.JPEG"), DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(shape, ImageShape::new(3, h, w));
    for (k, ink) in inks.iter().enumerate() {
        let want = cmyk_to_rgb(*ink);
        let at = 8 * w + 16 * k + 8;
        let got = [rgb[at], rgb[w * h + at], rgb[2 * w * h + at]];
        for c in 0..3 {
            assert!(want[c].abs_diff(got[c]) <= 3, "ink {ink:?}: want {want:?}, got {got:?}");
        }
    }
    // Pillow's formula on the extremes: no ink is white, full cyan has no red, black is black.
    assert_eq!(cmyk_to_rgb([0, 0, 0, 0]), [255, 255, 255]);
    assert_eq!(cmyk_to_rgb([255, 0, 0, 0]), [0, 255, 255]);
    assert_eq!(cmyk_to_rgb([0, 0, 0, 255]), [0, 0, 0]);
}

/// `jpeg` with an EXIF APP1 segment saying "rotate 90° clockwise" (orientation 6).
fn with_exif_orientation(jpeg: &[u8]) -> Vec<u8> {
    // TIFF header (little endian), one IFD with one entry: tag 0x0112 SHORT 1 value 6.
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend_from_slice(&[1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_is_ignored_as_torchvision_ignores_it() {
    let plain = rgb_jpeg(120, 80, SamplingFactor::F_2_2, false, 10);
    let rotated = with_exif_orientation(&plain);
    let p = Path::new("exif.JPEG");
    let a = decode(&plain, p, DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    let b = decode(&rotated, p, DEFAULT_MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(b.1, ImageShape::new(3, 80, 120));
    assert!(a == b);
}

fn png(
    pixels: &[u8],
    (w, h): (u32, u32),
    color: png::ColorType,
    palette: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = png::Encoder::new(&mut out, w, h);
    e.set_color(color);
    e.set_depth(png::BitDepth::Eight);
    if let Some(p) = palette {
        e.set_palette(p.to_vec());
    }
    let mut writer = e.write_header().unwrap();
    writer.write_image_data(pixels).unwrap();
    writer.finish().unwrap();
    out
}

#[test]
fn pngs_named_jpeg_are_decoded_like_pillows_convert_rgb() {
    let (w, h) = (40usize, 30usize);
    let rgb = photo(w, h, 3, 11);
    let planes = |hwc: &[u8], c: usize| -> Vec<u8> {
        (0..3).flat_map(|ch| hwc.iter().skip(ch.min(c - 1)).step_by(c).copied()).collect()
    };
    let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 77]).collect();
    let grey = photo(w, h, 1, 12);
    let index: Vec<u8> = (0..w * h).map(|i| (i % 3) as u8).collect();
    let palette = [255, 0, 0, 0, 255, 0, 0, 0, 255];
    let from_palette: Vec<u8> =
        index.iter().flat_map(|&i| palette[3 * i as usize..][..3].to_vec()).collect();
    let size = (w as u32, h as u32);
    let cases = [
        ("rgb", png(&rgb, size, png::ColorType::Rgb, None), planes(&rgb, 3)),
        ("rgba", png(&rgba, size, png::ColorType::Rgba, None), planes(&rgb, 3)),
        ("grey", png(&grey, size, png::ColorType::Grayscale, None), planes(&grey, 1)),
        (
            "palette",
            png(&index, size, png::ColorType::Indexed, Some(&palette)),
            planes(&from_palette, 3),
        ),
    ];
    for (name, file, want) in &cases {
        let (got, shape) = decode(file, Path::new("x.JPEG"), DEFAULT_MAX_IMAGE_PIXELS).unwrap();
        assert_eq!(shape, ImageShape::new(3, h, w), "{name}");
        assert!(&got == want, "{name}: PNG pixels differ");
    }
    // Through a folder and the train transform like any other sample.
    let files: Vec<(&str, Vec<u8>)> = cases.iter().map(|(n, f, _)| (*n, f.clone())).collect();
    let (_dir, ds) = folder(&files, |_| {});
    let t = rrc(24, (0.08, 1.0));
    for i in 0..ds.train.len() {
        let (fused, reference, shape) = both(&ds, i, &t, 3);
        assert_eq!(shape, ImageShape::new(3, 24, 24));
        assert_eq!(fused, reference);
    }
}

fn err(r: Result<impl std::fmt::Debug, mlaan_data::DataError>) -> String {
    r.expect_err("expected an error").to_string()
}

/// `jpeg` with its frame header (SOF0/SOF2) claiming `w`x`h` pixels.
fn claim_size(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = out.windows(2).position(|m| m == [0xff, 0xc0] || m == [0xff, 0xc2]).unwrap();
    out[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    out
}

/// A PNG whose header claims `w`x`h` pixels, followed by a token IDAT chunk.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        c.extend_from_slice(&crc.finalize().to_be_bytes());
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    out.extend(chunk(b"IEND", &[]));
    out
}

#[test]
fn bad_files_are_errors_that_name_the_file() {
    let good = rgb_jpeg(200, 150, SamplingFactor::F_2_2, false, 13);
    let progressive = rgb_jpeg(200, 150, SamplingFactor::F_2_2, true, 14);
    let p = Path::new("n01440764/n01440764_10026.JPEG");
    let max = DEFAULT_MAX_IMAGE_PIXELS;
    let t = rrc(64, (0.08, 1.0));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() * 6 / 10].to_vec(), "truncated"),
        ("truncated progressive", progressive[..progressive.len() / 2].to_vec(), "truncated"),
        ("cut after the header", good[..700].to_vec(), "truncated"),
        ("empty", Vec::new(), "empty file"),
        ("text", b"<html>not found</html>".to_vec(), "not a JPEG or PNG"),
        ("bomb", claim_size(&good, 40_000, 40_000), "exceeds data.max_image_pixels"),
        ("PNG bomb", png_claiming(100_000, 100_000), "exceeds data.max_image_pixels"),
        ("zero width", claim_size(&good, 0, 150), "undecodable JPEG"),
        ("broken PNG", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(), "undecodable PNG"),
    ];
    for (what, bytes, reason) in &cases {
        for e in [
            err(decode(bytes, p, max)),
            err(decode_transformed(bytes, p, max, &t, &mut sample_rng(0, 0, 0), &mut Vec::new())),
        ] {
            assert!(e.contains("n01440764_10026.JPEG") && e.contains(reason), "{what}: {e}");
        }
    }
    // A corrupt header: the quantisation table id points past the four tables.
    let mut corrupt = good.clone();
    let sof = corrupt.windows(2).position(|m| m == [0xff, 0xc0]).unwrap();
    corrupt[sof + 10 + 2] = 9;
    let e = err(decode(&corrupt, p, max));
    assert!(e.contains("n01440764_10026.JPEG") && e.contains("undecodable JPEG"), "{e}");
    // Trailing bytes after the end marker (some cameras pad files) are fine.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 100]);
    padded.extend_from_slice(b"trailing");
    assert!(decode(&padded, p, max).is_ok());
    // The pixel limit is the config's.
    assert!(err(decode(&good, p, 200 * 150 - 1)).contains("exceeds"));
    assert!(decode(&good, p, 200 * 150).is_ok());
}

#[test]
fn no_worker_is_lost_to_bad_files() {
    let good = rgb_jpeg(160, 120, SamplingFactor::F_2_2, false, 15);
    let mut files: Vec<(String, Vec<u8>)> =
        (0..12).map(|i| (format!("good_{i:02}.JPEG"), good.clone())).collect();
    files.push(("bad_truncated.JPEG".into(), good[..good.len() / 2].to_vec()));
    files.push(("bad_empty.JPEG".into(), Vec::new()));
    files.push(("bad_bomb.JPEG".into(), claim_size(&good, 60_000, 60_000)));
    files.push(("bad_text.JPEG".into(), b"GIF89a".to_vec()));
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let (_dir, ds) = folder(&refs, |c| c.on_bad_sample = OnBadSample::Skip);
    let cfg = LoaderConfig {
        batch_size: 4,
        workers: 2,
        on_bad_sample: OnBadSample::Skip,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(ds.train.clone(), ds.train_transform.clone(), cfg.clone());
    for epoch in 0..3 {
        let batches: Vec<_> = loader.epoch(epoch).map(|b| b.unwrap()).collect();
        assert_eq!(batches.len(), 4);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 12);
        assert_eq!(batches.iter().map(|b| b.skipped).sum::<usize>(), 4);
    }
    // "stop" ends the epoch with the file's error.
    let stop = Loader::new(
        ds.train.clone(),
        ds.train_transform.clone(),
        LoaderConfig { on_bad_sample: OnBadSample::Stop, ..cfg },
    );
    let e = stop.epoch(0).find_map(Result::err).expect("an error");
    assert!(e.to_string().contains("bad_"), "{e}");
}

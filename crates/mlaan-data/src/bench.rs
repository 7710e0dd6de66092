//! Loader throughput measurement and a generator of synthetic JPEG ImageFolder trees (used by
//! the benchmark, the tests and the `data make-imagefolder` command).

use crate::image::encode_jpeg;
use crate::loader::mix;
use crate::{DataError, Dataset, ImageShape, Loader, LoaderConfig, Transform};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Result of [`measure_throughput`].
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputReport {
    pub workers: usize,
    pub batch_size: usize,
    pub batches: usize,
    pub images: usize,
    pub wall_s: f64,
    pub images_per_s: f64,
    /// CPU time of the whole process (all threads) during the run, where the platform
    /// reports it: `images / cpu_s` is the cost per image even on a machine shared with
    /// other work, where wall-clock rates understate what the loader can do.
    pub cpu_s: Option<f64>,
    /// Output bytes per second (after augmentation).
    pub mb_per_s: f64,
    /// Batches that failed, and the first failure.
    pub errors: usize,
    pub first_error: Option<String>,
}

impl std::fmt::Display for ThroughputReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} workers, batch {}: {} images in {:.2} s = {:.0} images/s ({:.1} MB/s)",
            self.workers,
            self.batch_size,
            self.images,
            self.wall_s,
            self.images_per_s,
            self.mb_per_s
        )?;
        if let Some(cpu) = self.cpu_s.filter(|&c| c > 0.0) {
            write!(f, "; {cpu:.2} CPU-s = {:.0} images per CPU-second", self.images as f64 / cpu)?;
        }
        if let Some(e) = &self.first_error {
            write!(f, "; {} failed batches, first: {e}", self.errors)?;
        }
        Ok(())
    }
}

/// Runs the loader (shuffled, unordered, as training would) for `batches` batches — across
/// epochs if one is shorter — and times it from the first request to the last batch.
pub fn measure_throughput(
    dataset: Arc<dyn Dataset>,
    transform: Transform,
    workers: usize,
    batch_size: usize,
    batches: usize,
) -> ThroughputReport {
    let cfg = LoaderConfig {
        batch_size: batch_size.max(1),
        workers,
        ordered: false,
        drop_last: true,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(dataset, transform, cfg);
    let mut report = ThroughputReport {
        workers,
        batch_size,
        batches: 0,
        images: 0,
        wall_s: 0.0,
        images_per_s: 0.0,
        cpu_s: None,
        mb_per_s: 0.0,
        errors: 0,
        first_error: None,
    };
    let mut bytes = 0usize;
    let cpu_start = process_cpu_seconds();
    let start = Instant::now();
    let mut epoch = 0;
    while report.batches + report.errors < batches && loader.num_batches() > 0 {
        let want = batches - report.batches - report.errors;
        for item in loader.epoch(epoch).take(want) {
            match item {
                Ok(b) => {
                    report.batches += 1;
                    report.images += b.len();
                    bytes += b.images.len();
                }
                Err(e) => {
                    report.errors += 1;
                    report.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        epoch += 1;
        if report.errors > 0 && report.batches == 0 {
            break;
        }
    }
    report.wall_s = start.elapsed().as_secs_f64();
    report.cpu_s = cpu_start.zip(process_cpu_seconds()).map(|(a, b)| b - a);
    if report.wall_s > 0.0 {
        report.images_per_s = report.images as f64 / report.wall_s;
        report.mb_per_s = bytes as f64 / report.wall_s / 1e6;
    }
    report
}

/// User + system CPU time of this process (all threads), from `getrusage`.
#[cfg(unix)]
fn process_cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer we own; we read it only on success.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

#[cfg(not(unix))]
fn process_cpu_seconds() -> Option<f64> {
    None
}

/// Writes `dir/train/class_NNN/img_NNNNN.jpg` (`per_class` per class) and `dir/val/...`
/// (a tenth as many, at least one) of `width`x`height` JPEGs: smooth class-coloured gradients
/// with noise, deterministic in `seed`. Encoding runs on all cores.
pub fn write_synthetic_imagefolder(
    dir: &Path,
    classes: usize,
    per_class: usize,
    width: usize,
    height: usize,
    seed: u64,
) -> Result<(), DataError> {
    if classes == 0
        || per_class == 0
        || width == 0
        || height == 0
        || width > 65535
        || height > 65535
    {
        return Err(DataError::format(
            dir,
            format!("cannot generate {classes} classes x {per_class} images of {width}x{height}"),
        ));
    }
    let val_per_class = per_class.div_ceil(10);
    let mut jobs = Vec::new();
    for (split, n) in [("train", per_class), ("val", val_per_class)] {
        for c in 0..classes {
            let class_dir = dir.join(split).join(format!("class_{c:03}"));
            std::fs::create_dir_all(&class_dir).map_err(|e| DataError::io(&class_dir, e))?;
            jobs.extend(
                (0..n).map(|i| (class_dir.join(format!("img_{i:05}.jpg")), c, split == "val", i)),
            );
        }
    }
    let shape = ImageShape::new(3, height, width);
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<(), DataError> {
                    loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        let Some((path, class, val, i)) = jobs.get(j) else {
                            return Ok(());
                        };
                        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[
                            seed,
                            *class as u64,
                            *val as u64,
                            *i as u64,
                        ]));
                        let image = synthetic_photo(shape, *class, &mut rng);
                        let jpeg = encode_jpeg(&image, shape, 90)
                            .map_err(|e| DataError::format(path, e))?;
                        std::fs::write(path, jpeg).map_err(|e| DataError::io(path, e))?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(DataError::Loader("JPEG writer thread panicked".into()))
                })
            })
            .collect::<Result<Vec<()>, _>>()
    })?;
    Ok(())
}

/// A photo-like CHW image: a class-coloured diagonal gradient plus a random bright disc and
/// noise, so JPEG sizes and decode costs resemble real photographs more than flat colour.
fn synthetic_photo(shape: ImageShape, class: usize, rng: &mut impl Rng) -> Vec<u8> {
    let (h, w) = (shape.height, shape.width);
    let base = [(class * 67) % 256, (class * 131 + 60) % 256, (class * 199 + 120) % 256];
    let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
    let r2 = ((h.min(w) / 4).max(1) as f32).powi(2);
    let mut out = vec![0u8; shape.len()];
    for (c, plane) in out.chunks_exact_mut(h * w).enumerate() {
        for y in 0..h {
            for x in 0..w {
                let grad = (x + y) as f32 / (h + w) as f32 * 120.0;
                let d2 = ((y as f32 - cy as f32).powi(2) + (x as f32 - cx as f32).powi(2)) / r2;
                let disc = if d2 < 1.0 { 80.0 } else { 0.0 };
                let noise = rng.random_range(-20.0f32..20.0);
                plane[y * w + x] =
                    (base[c] as f32 * 0.5 + grad + disc + noise).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

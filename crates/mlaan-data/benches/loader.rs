//! Loader throughput on a generated ImageFolder of JPEG photos (500x375 by default), with
//! ImageNet training augmentation (RandomResizedCrop 224 + flip) and evaluation transform
//! (resize 256 + centre crop 224), for 1 and 2 decoder threads; plus CIFAR-style in-memory
//! augmentation.
//!
//! `cargo bench -p mlaan-data --bench loader`; `MLAAN_BENCH_IMAGES` (default 2000) sets the
//! tree size. A summary from `measure_throughput` is printed before criterion runs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mlaan_core::config::DataConfig;
use mlaan_data::{
    measure_throughput, open, write_synthetic_imagefolder, Datasets, Loader, LoaderConfig,
};
use std::sync::OnceLock;
use std::time::Instant;

const BATCH: usize = 32;

/// The generated tree lives for the whole run.
fn imagefolder() -> &'static (tempfile::TempDir, Datasets) {
    static TREE: OnceLock<(tempfile::TempDir, Datasets)> = OnceLock::new();
    TREE.get_or_init(|| {
        let images: usize =
            std::env::var("MLAAN_BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
        let dir = tempfile::tempdir().expect("temp dir");
        let t = Instant::now();
        write_synthetic_imagefolder(dir.path(), 10, images.div_ceil(10), 500, 375, 0)
            .expect("generate");
        let ds = open(&DataConfig {
            dataset: "imagefolder".into(),
            dir: Some(dir.path().into()),
            ..DataConfig::default()
        })
        .expect("open");
        eprintln!("generated {} in {:.1} s", ds.train.describe(), t.elapsed().as_secs_f64());
        (dir, ds)
    })
}

fn summary() {
    let (_, ds) = imagefolder();
    let batches = ds.train.len() / BATCH;
    for (name, transform) in [("train", &ds.train_transform), ("eval", &ds.eval_transform)] {
        for workers in [1, 2] {
            let r =
                measure_throughput(ds.train.clone(), transform.clone(), workers, BATCH, batches);
            eprintln!("imagefolder 500x375 JPEG, {name} transform ({transform}): {r}");
        }
    }
}

fn bench_imagefolder(c: &mut Criterion) {
    summary();
    let (_, ds) = imagefolder();
    let mut group = c.benchmark_group("imagefolder-500x375");
    group.sample_size(10);
    let per_iter = 4;
    group.throughput(Throughput::Elements((per_iter * BATCH) as u64));
    for (name, transform) in [("train", &ds.train_transform), ("eval", &ds.eval_transform)] {
        for workers in [1, 2] {
            let cfg = LoaderConfig {
                batch_size: BATCH,
                workers,
                ordered: false,
                ..LoaderConfig::default()
            };
            let loader = Loader::new(ds.train.clone(), transform.clone(), cfg);
            let mut epoch = 0;
            group.bench_with_input(BenchmarkId::new(name, workers), &workers, |b, _| {
                b.iter(|| {
                    epoch += 1;
                    loader
                        .epoch(epoch)
                        .take(per_iter)
                        .map(|r| r.expect("batch").len())
                        .sum::<usize>()
                })
            });
        }
    }
    group.finish();
}

fn bench_in_memory(c: &mut Criterion) {
    // CIFAR-shaped synthetic data with CIFAR augmentation: the cost of crop + flip + batching.
    let cfg = DataConfig {
        dataset: "synthetic".into(),
        synthetic_samples: 8192,
        synthetic_size: 32,
        ..DataConfig::default()
    };
    let mut ds = open(&cfg).expect("synthetic");
    ds.train_transform = mlaan_data::registry::resolve_transforms(
        mlaan_data::registry::spec("cifar10").expect("spec"),
        &Default::default(),
    )
    .expect("transforms")
    .0;
    let mut group = c.benchmark_group("synthetic-32x32-cifar-augment");
    group.sample_size(10);
    group.throughput(Throughput::Elements(8 * 128));
    for workers in [1, 2] {
        let loader = Loader::new(
            ds.train.clone(),
            ds.train_transform.clone(),
            LoaderConfig { batch_size: 128, workers, ..LoaderConfig::default() },
        );
        let mut epoch = 0;
        group.bench_with_input(BenchmarkId::from_parameter(workers), &workers, |b, _| {
            b.iter(|| {
                epoch += 1;
                loader.epoch(epoch).take(8).map(|r| r.expect("batch").len()).sum::<usize>()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_imagefolder, bench_in_memory);
criterion_main!(benches);

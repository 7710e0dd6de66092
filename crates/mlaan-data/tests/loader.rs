//! Loader behaviour: determinism across worker counts, ordering, sharding, resume,
//! cancellation, and bad-sample policies.

use mlaan_core::config::{OnBadSample, PadMode};
use mlaan_data::{
    Batch, DataError, Dataset, ImageShape, Loader, LoaderConfig, Op, Sample, Transform,
};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `n` samples of 3x6x6 whose pixels encode the index; `bad` indices fail to "decode";
/// `delay` simulates slow decoding.
struct TestSet {
    n: usize,
    bad: Vec<usize>,
    delay: Duration,
}

impl Dataset for TestSet {
    fn len(&self) -> usize {
        self.n
    }
    fn num_classes(&self) -> usize {
        5
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        std::thread::sleep(self.delay);
        if self.bad.contains(&index) {
            return Err(DataError::Format {
                path: format!("img_{index}.jpg").into(),
                reason: "undecodable JPEG".into(),
            });
        }
        Ok(Sample {
            image: (0..108).map(|j| (index * 7 + j) as u8).collect(),
            shape: ImageShape::new(3, 6, 6),
            label: (index % 5) as u32,
        })
    }
    fn label(&self, index: usize) -> u32 {
        (index % 5) as u32
    }
    fn describe(&self) -> String {
        format!("test set: {} images", self.n)
    }
}

fn set(n: usize) -> Arc<TestSet> {
    Arc::new(TestSet { n, bad: vec![], delay: Duration::ZERO })
}

fn augment() -> Transform {
    Transform::new(vec![Op::PadCrop { pad: 2, mode: PadMode::Reflect, size: None }, Op::HFlip])
}

fn cfg(batch_size: usize, workers: usize) -> LoaderConfig {
    LoaderConfig { batch_size, workers, seed: 42, ..LoaderConfig::default() }
}

fn collect(loader: &Loader, epoch: usize) -> Vec<Batch> {
    loader.epoch(epoch).map(Result::unwrap).collect()
}

#[test]
fn identical_batches_for_any_worker_count() {
    let ds = set(50);
    let one = collect(&Loader::new(ds.clone(), augment(), cfg(8, 1)), 3);
    let three = collect(&Loader::new(ds.clone(), augment(), cfg(8, 3)), 3);
    assert_eq!(one, three);
    assert_eq!(one.len(), 7);
    assert_eq!(one[0].shape, [8, 3, 6, 6]);
    assert_eq!(one[6].shape[0], 2, "last partial batch kept without drop_last");
    // Another epoch is another permutation and other augmentations.
    let other = collect(&Loader::new(ds, augment(), cfg(8, 2)), 4);
    assert_ne!(one[0].sample_ids, other[0].sample_ids);
    // Labels follow the samples.
    for b in &one {
        for (id, l) in b.sample_ids.iter().zip(&b.labels) {
            assert_eq!(*l, (*id % 5) as i64);
        }
    }
}

#[test]
fn ordered_delivery_and_unordered_mode_cover_the_same_batches() {
    let slow = Arc::new(TestSet { n: 40, bad: vec![], delay: Duration::from_millis(1) });
    let ordered = collect(&Loader::new(slow.clone(), augment(), cfg(4, 3)), 0);
    assert_eq!(ordered.iter().map(|b| b.index).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    let mut c = cfg(4, 3);
    c.ordered = false;
    let mut unordered = collect(&Loader::new(slow, augment(), c), 0);
    unordered.sort_by_key(|b| b.index);
    assert_eq!(ordered, unordered);
    // Without shuffling the order is the dataset's.
    let mut c = cfg(4, 2);
    c.shuffle = false;
    let plain = collect(&Loader::new(set(10), Transform::identity(), c), 0);
    assert_eq!(
        plain.iter().flat_map(|b| b.sample_ids.clone()).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
}

/// Shard `rank` of 4 of `ds` in batches of 5, `drop_last` as given (training: true).
fn shard(ds: &Arc<TestSet>, rank: usize, drop_last: bool) -> Loader {
    let mut c = cfg(5, 2);
    c.drop_last = drop_last;
    c.shard_rank = rank;
    c.shard_count = 4;
    Loader::new(ds.clone(), Transform::identity(), c)
}

/// The samples of every shard of `ds` in epoch `epoch`, by rank, checking they are disjoint.
fn disjoint_shards(ds: &Arc<TestSet>, drop_last: bool, epoch: usize) -> Vec<Vec<usize>> {
    let mut seen = BTreeSet::new();
    (0..4)
        .map(|rank| {
            let loader = shard(ds, rank, drop_last);
            let ids: Vec<usize> =
                collect(&loader, epoch).into_iter().flat_map(|b| b.sample_ids).collect();
            assert_eq!(ids, loader.epoch_samples(epoch), "rank {rank}");
            assert_eq!(loader.num_batches(), ids.len().div_ceil(5), "rank {rank}");
            for &id in &ids {
                assert!(seen.insert(id), "sample {id} in two shards");
            }
            ids
        })
        .collect()
}

/// Training shards (`drop_last`): every rank the same number of samples and steps.
#[test]
fn shards_are_disjoint_equal_and_cover_the_permutation() {
    let ds = set(103);
    let shards = disjoint_shards(&ds, true, 1);
    assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), [25; 4]);
    // Together the shards are the first 100 positions of the unsharded permutation, and
    // shard r's batch b is the r-th run of 5 in the b-th global batch of 20.
    let whole = Loader::new(ds.clone(), Transform::identity(), cfg(5, 1)).epoch_samples(1);
    let seen: BTreeSet<usize> = shards.iter().flatten().copied().collect();
    assert_eq!(seen, whole[..100].iter().copied().collect());
    for rank in 0..4 {
        for (b, batch) in collect(&shard(&ds, rank, true), 1).into_iter().enumerate() {
            assert_eq!(batch.sample_ids, whole[b * 20 + rank * 5..][..5], "rank {rank} batch {b}");
        }
    }
}

/// Evaluation shards (no `drop_last`): together every sample exactly once, the last `n mod R`
/// one each to the first shards.
#[test]
fn evaluation_shards_hold_every_sample_once() {
    let ds = set(103);
    let shards = disjoint_shards(&ds, false, 0);
    assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), [26, 26, 26, 25]);
    let seen: BTreeSet<usize> = shards.iter().flatten().copied().collect();
    assert_eq!(seen, (0..103).collect());
}

#[test]
fn start_batch_resumes_with_the_tail_of_the_epoch() {
    let ds = set(45);
    let mut c = cfg(6, 2);
    c.drop_last = true;
    let full = collect(&Loader::new(ds.clone(), augment(), c.clone()), 2);
    assert_eq!(full.len(), 7);
    c.start_batch = 4;
    let resumed = Loader::new(ds.clone(), augment(), c.clone());
    assert_eq!(resumed.num_batches(), 7);
    assert_eq!(collect(&resumed, 2), full[4..]);
    c.start_batch = 99;
    assert!(collect(&Loader::new(ds, augment(), c), 2).is_empty());
}

#[test]
fn dropping_a_stream_mid_epoch_stops_and_joins_promptly() {
    let ds = Arc::new(TestSet { n: 400, bad: vec![], delay: Duration::from_millis(5) });
    let mut c = cfg(4, 3);
    c.prefetch = 2;
    let loader = Loader::new(ds.clone(), augment(), c);
    let mut stream = loader.epoch(0);
    assert!(stream.next().unwrap().is_ok());
    // Let the workers fill every slot and block.
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    drop(stream);
    assert!(t.elapsed() < Duration::from_secs(1), "drop took {:?}", t.elapsed());
    // Only the test and the loader still hold the dataset: every worker thread is gone.
    assert_eq!(Arc::strong_count(&ds), 2);
    // A stream that was never read is dropped just as promptly.
    let stream = loader.epoch(1);
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(stream);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(Arc::strong_count(&ds), 2);
}

#[test]
fn bad_samples_are_skipped_or_stop_the_epoch() {
    let ds = Arc::new(TestSet { n: 12, bad: vec![5], delay: Duration::ZERO });
    let mut c = cfg(4, 2);
    c.shuffle = false;
    c.on_bad_sample = OnBadSample::Skip;
    let batches = collect(&Loader::new(ds.clone(), augment(), c.clone()), 0);
    assert_eq!(batches.iter().map(|b| b.skipped).collect::<Vec<_>>(), [0, 1, 0]);
    assert_eq!(batches[1].sample_ids, [4, 6, 7]);
    assert_eq!(batches[1].shape, [3, 3, 6, 6]);
    assert_eq!(batches[1].images.len(), 3 * 108);

    c.on_bad_sample = OnBadSample::Stop;
    let items: Vec<_> = Loader::new(ds, augment(), c).epoch(0).collect();
    assert_eq!(items.len(), 2, "the error ends the epoch");
    assert!(items[0].is_ok());
    let e = items[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("img_5.jpg") && e.contains("undecodable"), "{e}");
}

/// A dataset whose decoder panics on some samples (third-party code fed a hostile file).
struct Panicky {
    inner: TestSet,
    panic_on: Vec<usize>,
}

impl Dataset for Panicky {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if self.panic_on.contains(&index) {
            panic!("decoder bug on sample {index}");
        }
        self.inner.get(index)
    }
    fn label(&self, index: usize) -> u32 {
        self.inner.label(index)
    }
    fn describe(&self) -> String {
        "panicky set".into()
    }
}

#[test]
fn a_panicking_decoder_costs_its_sample_not_a_worker() {
    let inner = TestSet { n: 24, bad: vec![], delay: Duration::ZERO };
    let ds = Arc::new(Panicky { inner, panic_on: vec![3, 10, 17] });
    let mut c = cfg(4, 2);
    c.on_bad_sample = OnBadSample::Skip;
    let loader = Loader::new(ds.clone(), augment(), c.clone());
    for epoch in 0..2 {
        let batches = collect(&loader, epoch);
        assert_eq!(batches.len(), 6, "every batch arrives");
        assert_eq!(batches.iter().map(|b| b.skipped).sum::<usize>(), 3);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 21);
    }
    c.on_bad_sample = OnBadSample::Stop;
    c.shuffle = false;
    let e = Loader::new(ds, augment(), c).epoch(0).find_map(Result::err).expect("an error");
    let text = e.to_string();
    assert!(text.contains("panicked") && text.contains("decoder bug on sample 3"), "{text}");
}

#[test]
fn transform_failures_name_the_sample_and_bad_configs_yield_an_error() {
    let crop_too_big =
        Transform::new(vec![Op::PadCrop { pad: 0, mode: PadMode::Zero, size: Some(9) }]);
    let mut c = cfg(4, 1);
    c.shuffle = false;
    let first = Loader::new(set(8), crop_too_big, c).epoch(0).next().unwrap();
    let e = first.unwrap_err().to_string();
    assert!(e.contains("sample 0") && e.contains("9x9 crop"), "{e}");

    let mut bad = cfg(0, 1);
    let loader = Loader::new(set(8), Transform::identity(), bad.clone());
    assert_eq!(loader.num_batches(), 0);
    let items: Vec<_> = loader.epoch(0).collect();
    assert_eq!(items.len(), 1);
    assert!(items[0].as_ref().unwrap_err().to_string().contains("batch_size"));
    bad.batch_size = 2;
    bad.shard_rank = 3;
    bad.shard_count = 3;
    let items: Vec<_> = Loader::new(set(8), Transform::identity(), bad).epoch(0).collect();
    assert!(items[0].as_ref().unwrap_err().to_string().contains("shard rank 3"));
}

#[test]
fn drop_last_and_batch_counts() {
    let mut c = cfg(4, 1);
    c.drop_last = true;
    assert_eq!(Loader::new(set(10), Transform::identity(), c.clone()).num_batches(), 2);
    c.drop_last = false;
    assert_eq!(Loader::new(set(10), Transform::identity(), c.clone()).num_batches(), 3);
    assert_eq!(Loader::new(set(0), Transform::identity(), c).epoch(0).count(), 0);
}

//! Every reader against small files written in the exact published format, pixel for pixel,
//! and corrupt variants that must fail with the file and the reason.

mod common;

use common::*;
use mlaan_core::config::{DataConfig, DEFAULT_MAX_IMAGE_PIXELS};
use mlaan_data::readers::{cifar, folder::ImageFolder, idx, stl10, svhn};
use mlaan_data::{open, DataError, ImageShape};
use std::path::Path;

fn cfg(dataset: &str, dir: &Path) -> DataConfig {
    DataConfig { dataset: dataset.into(), dir: Some(dir.into()), ..DataConfig::default() }
}

fn err_text(r: Result<impl std::fmt::Debug, DataError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn idx_plain_and_gzipped_read_back_exactly() {
    for zipped in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (train, train_labels) = write_idx_split(dir.path(), "train", 7, 5, 4, zipped);
        let (test, _) = write_idx_split(dir.path(), "t10k", 3, 5, 4, zipped);
        let ds = open(&cfg("mnist", dir.path())).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (7, 3));
        for (i, img) in train.iter().enumerate() {
            let s = ds.train.get(i).unwrap();
            assert_eq!(s.shape, ImageShape::new(1, 5, 4));
            assert_eq!(&s.image, img, "train image {i} (gz={zipped})");
            assert_eq!(s.label, u32::from(train_labels[i]));
            assert_eq!(ds.train.label(i), s.label);
        }
        assert_eq!(ds.test.get(2).unwrap().image, test[2]);
        assert!(ds.train.describe().contains("MNIST train: 7 images 1x5x4, 10 classes"));
    }
}

#[test]
fn idx_corruptions_name_the_file_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x-images-idx3-ubyte");
    let good = idx(2051, &[2, 3, 3], &[0; 18]);
    let parse = |b: &[u8]| idx::parse(b, idx::IMAGES_MAGIC, &p).map(|a| a.dims);
    assert!(parse(&good).is_ok());
    let wrong_magic = idx(2049, &[2, 3, 3], &[0; 18]);
    let e = err_text(parse(&wrong_magic));
    assert!(e.contains("x-images-idx3-ubyte") && e.contains("magic"), "{e}");
    let e = err_text(parse(&good[..good.len() - 1]));
    assert!(e.contains("truncated") && e.contains("x-images-idx3-ubyte"), "{e}");
    let e = err_text(parse(&good[..6]));
    assert!(e.contains("truncated"), "{e}");
    let mut long = good.clone();
    long.push(0);
    assert!(err_text(parse(&long)).contains("unexpected bytes"));

    // Label out of range, and label/image count mismatch, through the reader.
    write_idx_split(dir.path(), "train", 4, 2, 2, false);
    write_idx_split(dir.path(), "t10k", 2, 2, 2, false);
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), idx(2049, &[4], &[1, 12, 3, 4]))
        .unwrap();
    let e = err_text(idx::open(dir.path(), "train", "MNIST train", 10));
    assert!(e.contains("train-labels-idx1-ubyte, record 1: label 12 out of range"), "{e}");
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), idx(2049, &[3], &[1, 2, 3]))
        .unwrap();
    let e = err_text(idx::open(dir.path(), "train", "MNIST train", 10));
    assert!(e.contains("3 labels") && e.contains("4 images"), "{e}");
    // A truncated gzip stream.
    let zipped = gz(&idx(2051, &[4, 2, 2], &[0; 16]));
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), &zipped[..zipped.len() / 2]).unwrap();
    let e = err_text(idx::open(dir.path(), "t10k", "MNIST test", 10));
    assert!(e.contains("t10k-images-idx3-ubyte") && e.contains("gzip"), "{e}");
    // Missing files.
    let empty = tempfile::tempdir().unwrap();
    let e = err_text(open(&cfg("mnist", empty.path())));
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
}

fn cifar_images(n: usize, seed: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| pattern(seed + i, 3072)).collect()
}

#[test]
fn cifar10_binary_nested_and_flat_layouts() {
    for nested in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let root =
            if nested { dir.path().join("cifar-10-batches-bin") } else { dir.path().to_path_buf() };
        std::fs::create_dir_all(&root).unwrap();
        let mut all = Vec::new();
        for b in 1..=5 {
            let imgs = cifar_images(2, b * 10);
            let labels: Vec<Vec<u8>> = (0..2).map(|i| vec![((b + i) % 10) as u8]).collect();
            std::fs::write(root.join(format!("data_batch_{b}.bin")), cifar_file(&labels, &imgs))
                .unwrap();
            all.extend(imgs.into_iter().zip(labels));
        }
        let test_imgs = cifar_images(3, 99);
        let test_labels = vec![vec![9], vec![0], vec![5]];
        std::fs::write(root.join("test_batch.bin"), cifar_file(&test_labels, &test_imgs)).unwrap();
        let ds = open(&cfg("cifar10", dir.path())).unwrap();
        assert_eq!((ds.train.len(), ds.test.len(), ds.info.num_classes), (10, 3, 10));
        for (i, (img, label)) in all.iter().enumerate() {
            let s = ds.train.get(i).unwrap();
            assert_eq!(&s.image, img);
            assert_eq!(s.label, u32::from(label[0]));
        }
        assert_eq!(ds.test.get(0).unwrap().label, 9);
        assert_eq!(ds.test.get(2).unwrap().image, test_imgs[2]);
        assert!(ds.train.get(10).is_err());
    }
}

#[test]
fn cifar100_fine_and_coarse_labels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cifar-100-binary");
    std::fs::create_dir_all(&root).unwrap();
    let imgs = cifar_images(3, 5);
    let labels = vec![vec![3, 77], vec![19, 99], vec![0, 0]];
    std::fs::write(root.join("train.bin"), cifar_file(&labels, &imgs)).unwrap();
    std::fs::write(root.join("test.bin"), cifar_file(&labels[..1], &imgs[..1])).unwrap();
    let mut c = cfg("cifar100", dir.path());
    let fine = open(&c).unwrap();
    assert_eq!(fine.info.num_classes, 100);
    assert_eq!((0..3).map(|i| fine.train.label(i)).collect::<Vec<_>>(), [77, 99, 0]);
    assert_eq!(fine.train.get(1).unwrap().image, imgs[1]);
    c.cifar100_labels = "coarse".into();
    let coarse = open(&c).unwrap();
    assert_eq!(coarse.info.num_classes, 20);
    assert_eq!((0..3).map(|i| coarse.train.label(i)).collect::<Vec<_>>(), [3, 19, 0]);
    c.cifar100_labels = "medium".into();
    assert!(err_text(open(&c)).contains("data.cifar100_labels"));
}

#[test]
fn cifar_corruptions_name_file_and_record() {
    let p = Path::new("data_batch_3.bin");
    let imgs = cifar_images(3, 1);
    let good = cifar_file(&[vec![1], vec![2], vec![3]], &imgs);
    let run =
        |b: &[u8], layout| cifar::parse_records(b, layout, p, &mut Vec::new(), &mut Vec::new());
    assert!(run(&good, cifar::CIFAR10).is_ok());
    let e = err_text(run(&good[..good.len() - 10], cifar::CIFAR10));
    assert!(e.contains("data_batch_3.bin, record 2") && e.contains("truncated"), "{e}");
    let bad = cifar_file(&[vec![1], vec![10], vec![3]], &imgs);
    let e = err_text(run(&bad, cifar::CIFAR10));
    assert!(e.contains("data_batch_3.bin, record 1: label 10 out of range 0..10"), "{e}");
    let bad100 = cifar_file(&[vec![1, 5], vec![2, 100]], &imgs[..2]);
    assert!(err_text(run(&bad100, cifar::CIFAR100_FINE)).contains("record 1: label 100"));
    assert!(err_text(run(&[], cifar::CIFAR10)).contains("empty"));
}

#[test]
fn svhn_mat_compressed_and_plain_column_major() {
    let images: Vec<Vec<u8>> = (0..4).map(|i| pattern(i * 3, 3072)).collect();
    let digits = [0, 1, 9, 5];
    for (compress, y_u8) in [(true, false), (false, false), (true, true), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("train_32x32.mat"),
            svhn_mat(&images, &digits, compress, y_u8),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("test_32x32.mat"),
            svhn_mat(&images[..1], &digits[..1], compress, y_u8),
        )
        .unwrap();
        let ds = open(&cfg("svhn", dir.path())).unwrap();
        assert_eq!(ds.train.len(), 4);
        for (i, img) in images.iter().enumerate() {
            let s = ds.train.get(i).unwrap();
            assert_eq!(&s.image, img, "image {i} compress={compress}");
            assert_eq!(s.label, digits[i]);
        }
    }
}

#[test]
fn svhn_extra_is_appended_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<Vec<u8>> = (0..2).map(|i| pattern(i, 3072)).collect();
    let b: Vec<Vec<u8>> = (0..3).map(|i| pattern(i + 50, 3072)).collect();
    std::fs::write(dir.path().join("train_32x32.mat"), svhn_mat(&a, &[1, 2], true, false)).unwrap();
    std::fs::write(dir.path().join("test_32x32.mat"), svhn_mat(&a, &[1, 2], true, false)).unwrap();
    std::fs::write(dir.path().join("extra_32x32.mat"), svhn_mat(&b, &[3, 4, 0], true, false))
        .unwrap();
    let mut c = cfg("svhn", dir.path());
    assert_eq!(open(&c).unwrap().train.len(), 2);
    c.svhn_extra = true;
    let ds = open(&c).unwrap();
    assert_eq!(ds.train.len(), 5);
    assert_eq!(ds.train.get(4).unwrap().image, b[2]);
    assert_eq!(ds.train.label(4), 0);
}

#[test]
fn svhn_corruptions() {
    let p = Path::new("train_32x32.mat");
    let images: Vec<Vec<u8>> = (0..2).map(|i| pattern(i, 3072)).collect();
    let run = |b: &[u8]| svhn::decode(b, p, &mut Vec::new(), &mut Vec::new());
    for compress in [true, false] {
        let good = svhn_mat(&images, &[1, 2], compress, false);
        assert!(run(&good).is_ok());
        let e = err_text(run(&good[..good.len() - 7]));
        assert!(e.contains("train_32x32.mat"), "{e}");
        assert!(e.contains("truncated") || e.contains("zlib"), "{e}");
    }
    assert!(err_text(run(b"short")).contains("128-byte"));
    let mut not_mat = vec![b' '; 200];
    not_mat[126] = b'X';
    assert!(err_text(run(&not_mat)).contains("endian indicator"));
    let bad_label = svhn_mat(&images, &[1, 11], true, false);
    // 11 is stored as 11.0 (our writer maps only 0 to 10).
    assert!(err_text(run(&bad_label)).contains("record 1: label 11"));
    use mlaan_data::readers::mat5::{self, MatClass, WriteVar};
    let x = WriteVar {
        name: "X",
        class: MatClass::UInt8,
        dims: &[32, 32, 1],
        storage: mat5::storage::UINT8,
        data: &[0; 1024],
    };
    let wrong_dims = mat5::write(&[x], true);
    assert!(err_text(run(&wrong_dims)).contains("`X` has dimensions [32, 32, 1]"));
}

#[test]
fn stl10_binary_is_transposed_to_row_major() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stl10_binary");
    std::fs::create_dir_all(&root).unwrap();
    let images: Vec<Vec<u8>> = (0..3).map(|i| pattern(i * 11, 27648)).collect();
    std::fs::write(root.join("train_X.bin"), stl_x(&images)).unwrap();
    std::fs::write(root.join("train_y.bin"), [1u8, 10, 4]).unwrap();
    std::fs::write(root.join("test_X.bin"), stl_x(&images[..1])).unwrap();
    std::fs::write(root.join("test_y.bin"), [2u8]).unwrap();
    std::fs::write(
        root.join("class_names.txt"),
        "airplane\nbird\ncar\ncat\ndeer\ndog\nhorse\nmonkey\nship\ntruck\n",
    )
    .unwrap();
    let ds = open(&cfg("stl10", dir.path())).unwrap();
    for (i, img) in images.iter().enumerate() {
        assert_eq!(&ds.train.get(i).unwrap().image, img, "image {i}");
    }
    assert_eq!((0..3).map(|i| ds.train.label(i)).collect::<Vec<_>>(), [0, 9, 3]);
    assert_eq!(ds.info.class_names.as_ref().unwrap()[9], "truck");
    // Corruptions.
    let e = err_text(stl10::parse_labels(&[1, 0, 3], Path::new("train_y.bin")));
    assert!(e.contains("train_y.bin, record 1: label 0 out of range"), "{e}");
    let e = err_text(stl10::parse_images(&[0; 27647], Path::new("train_X.bin"), &mut Vec::new()));
    assert!(e.contains("train_X.bin") && e.contains("truncated"), "{e}");
    std::fs::write(root.join("train_y.bin"), [1u8, 2]).unwrap();
    assert!(err_text(open(&cfg("stl10", dir.path()))).contains("2 labels"));
}

fn write_jpeg_tree(
    root: &Path,
    split: &str,
    classes: &[&str],
    per_class: usize,
    shape: ImageShape,
) -> Vec<(Vec<u8>, u32)> {
    let mut out = Vec::new();
    for (c, name) in classes.iter().enumerate() {
        let d = root.join(split).join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let img = smooth(shape, c * 10 + i);
            std::fs::write(d.join(format!("{i:03}.jpg")), jpeg(&img, shape)).unwrap();
            out.push((img, c as u32));
        }
    }
    out
}

#[test]
fn imagefolder_decodes_jpegs_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let shape = ImageShape::new(3, 24, 40);
    let train = write_jpeg_tree(dir.path(), "train", &["ant", "bee", "cat"], 3, shape);
    write_jpeg_tree(dir.path(), "val", &["bee"], 2, shape);
    let ds = open(&cfg("imagefolder", dir.path())).unwrap();
    assert_eq!(ds.info.class_names.as_deref().unwrap(), ["ant", "bee", "cat"]);
    assert_eq!((ds.train.len(), ds.test.len()), (9, 2));
    for (i, (img, label)) in train.iter().enumerate() {
        let s = ds.train.get(i).unwrap();
        assert_eq!(s.shape, shape);
        assert_eq!(s.label, *label);
        let d = mean_abs_diff(&s.image, img);
        assert!(d < 4.0, "sample {i}: mean abs diff {d}");
    }
    // The val split maps class names through the training classes.
    assert_eq!(ds.test.label(0), 1);
    // Greyscale JPEGs come out as three equal channels.
    let grey = ImageShape::new(1, 16, 16);
    let g = smooth(grey, 3);
    let (rgb, s) =
        mlaan_data::image::decode(&jpeg(&g, grey), Path::new("g.jpg"), DEFAULT_MAX_IMAGE_PIXELS)
            .unwrap();
    assert_eq!(s, ImageShape::new(3, 16, 16));
    assert_eq!(rgb[..256], rgb[256..512]);
    assert!(mean_abs_diff(&rgb[..256], &g) < 3.0);
}

#[test]
fn imagefolder_errors_name_the_folder_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let shape = ImageShape::new(3, 8, 8);
    write_jpeg_tree(dir.path(), "train", &["a", "b"], 2, shape);
    write_jpeg_tree(dir.path(), "val", &["a"], 1, shape);
    std::fs::create_dir_all(dir.path().join("train/c_empty")).unwrap();
    let e = err_text(open(&cfg("imagefolder", dir.path())));
    assert!(e.contains("c_empty") && e.contains("empty class folder"), "{e}");
    std::fs::remove_dir(dir.path().join("train/c_empty")).unwrap();

    std::fs::write(dir.path().join("train/b/notes.txt"), "not an image").unwrap();
    std::fs::write(dir.path().join("train/b/zz_broken.jpg"), [0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 4])
        .unwrap();
    let ds = open(&cfg("imagefolder", dir.path())).unwrap();
    let names: Vec<String> = (0..ds.train.len())
        .map(|i| match ds.train.get(i) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        })
        .collect();
    assert!(names.iter().any(|e| e.contains("notes.txt") && e.contains("not a JPEG")), "{names:?}");
    assert!(
        names.iter().any(|e| e.contains("zz_broken.jpg") && e.contains("undecodable")),
        "{names:?}"
    );
    std::fs::create_dir_all(dir.path().join("val/unknown")).unwrap();
    std::fs::write(dir.path().join("val/unknown/x.jpg"), b"x").unwrap();
    assert!(err_text(open(&cfg("imagefolder", dir.path())))
        .contains("not present in the training split"));
    let png = mlaan_data::image::decode(
        b"\x89PNG\r\n\x1a\n",
        Path::new("p.png"),
        DEFAULT_MAX_IMAGE_PIXELS,
    );
    assert!(err_text(png).contains("PNG"));
    let e = err_text(ImageFolder::scan_classes(&dir.path().join("nope")));
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn synthetic_is_deterministic_and_class_dependent() {
    let c = DataConfig {
        dataset: "synthetic".into(),
        synthetic_samples: 40,
        synthetic_classes: 4,
        synthetic_size: 8,
        synthetic_channels: 3,
        ..DataConfig::default()
    };
    let a = open(&c).unwrap();
    let b = open(&c).unwrap();
    assert_eq!(a.train.len(), 40);
    assert_eq!(a.train.get(7).unwrap(), b.train.get(7).unwrap());
    assert_ne!(a.train.get(7).unwrap().image, a.test.get(7).unwrap().image);
    assert_eq!(a.info.train_shape, ImageShape::new(3, 8, 8));
    assert_eq!(a.info.mean, vec![0.5; 3]);
    // Images of one class are closer to each other than to another class's (on average).
    let img = |i: usize| a.train.get(i).unwrap().image;
    let same = mean_abs_diff(&img(0), &img(4)) + mean_abs_diff(&img(8), &img(12));
    let diff = mean_abs_diff(&img(0), &img(1)) + mean_abs_diff(&img(8), &img(9));
    assert!(same < diff, "same {same} diff {diff}");
}

/// The real Fashion-MNIST of Debian's `dataset-fashion-mnist`, when installed.
#[test]
fn real_fashion_mnist_when_installed() {
    let dir = Path::new(mlaan_data::registry::DEBIAN_FASHION_MNIST);
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!("skipped: {} not installed", dir.display());
        return;
    }
    let ds = open(&DataConfig::default()).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (60000, 10000));
    assert_eq!(ds.info.train_shape, ImageShape::new(1, 28, 28));
    let mut hist = [0usize; 10];
    (0..ds.train.len()).for_each(|i| hist[ds.train.label(i) as usize] += 1);
    assert_eq!(hist, [6000; 10], "Fashion-MNIST training classes are balanced");
    let s = ds.train.get(0).unwrap();
    assert_eq!(s.image.len(), 784);
    assert!(s.image.iter().any(|&p| p > 0));
    assert!(ds
        .train
        .describe()
        .starts_with("Fashion-MNIST train: 60000 images 1x28x28, 10 classes"));
}

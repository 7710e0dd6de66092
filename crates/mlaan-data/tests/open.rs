//! `open`'s per-dataset defaults, overrides and configuration errors, and `verify`.

mod common;

use mlaan_core::config::{AugmentConfig, DataConfig, PadMode};
use mlaan_data::registry::{resolve_transforms, spec};
use mlaan_data::{open, verify, ImageShape, Op};

fn ops(name: &str, aug: &AugmentConfig) -> (Vec<Op>, Vec<Op>) {
    let (t, e) = resolve_transforms(spec(name).unwrap(), aug).unwrap();
    (t.ops().to_vec(), e.ops().to_vec())
}

#[test]
fn method_defaults_per_dataset() {
    let none = AugmentConfig::default();
    let pad = |pad, mode| Op::PadCrop { pad, mode, size: None };
    assert_eq!(ops("cifar10", &none), (vec![pad(4, PadMode::Reflect), Op::HFlip], vec![]));
    assert_eq!(ops("cifar100", &none).0, vec![pad(4, PadMode::Reflect), Op::HFlip]);
    assert_eq!(ops("svhn", &none).0, vec![pad(2, PadMode::Zero)]);
    assert_eq!(ops("stl10", &none).0, vec![pad(4, PadMode::Zero), Op::HFlip]);
    assert_eq!(ops("fashion-mnist", &none).0, vec![pad(2, PadMode::Zero), Op::HFlip]);
    assert_eq!(ops("mnist", &none).0, vec![pad(2, PadMode::Zero)]);
    assert_eq!(ops("synthetic", &none), (vec![], vec![]));
    let rrc = Op::RandomResizedCrop { size: 224, scale: (0.08, 1.0), ratio: (0.75, 4.0 / 3.0) };
    let eval = vec![Op::ResizeShorter { size: 256 }, Op::CenterCrop { size: 224 }];
    assert_eq!(ops("imagenet", &none), (vec![rrc, Op::HFlip], eval.clone()));
    assert_eq!(ops("imagefolder", &none).1, eval);
    let cifar = spec("cifar10").unwrap();
    assert!(
        (cifar.mean[0] - 125.3 / 255.0).abs() < 1e-6 && (cifar.std[2] - 66.7 / 255.0).abs() < 1e-6
    );
}

#[test]
fn overrides_and_their_errors() {
    let aug = AugmentConfig { disable: true, ..AugmentConfig::default() };
    assert_eq!(ops("cifar10", &aug), (vec![], vec![]));
    let (t, e) = ops("imagenet", &aug);
    assert_eq!(t, e, "disabled augmentation on photos still resizes to a fixed shape");
    let aug =
        AugmentConfig { crop_padding: Some(0), flip: Some(false), ..AugmentConfig::default() };
    assert_eq!(ops("cifar10", &aug).0, vec![]);
    let aug = AugmentConfig {
        pad_mode: Some(PadMode::Zero),
        crop_size: Some(28),
        ..AugmentConfig::default()
    };
    assert_eq!(
        ops("cifar10", &aug),
        (
            vec![Op::PadCrop { pad: 4, mode: PadMode::Zero, size: Some(28) }, Op::HFlip],
            vec![Op::CenterCrop { size: 28 }]
        )
    );
    let aug =
        AugmentConfig { crop_size: Some(160), eval_resize: Some(182), ..AugmentConfig::default() };
    assert_eq!(
        ops("imagenet", &aug).1,
        vec![Op::ResizeShorter { size: 182 }, Op::CenterCrop { size: 160 }]
    );
    let bad = AugmentConfig { crop_padding: Some(4), ..AugmentConfig::default() };
    let e = resolve_transforms(spec("imagenet").unwrap(), &bad).unwrap_err().to_string();
    assert!(e.contains("data.augment.crop_padding"), "{e}");
    let bad = AugmentConfig { crop_size: Some(0), ..AugmentConfig::default() };
    assert!(resolve_transforms(spec("cifar10").unwrap(), &bad)
        .unwrap_err()
        .to_string()
        .contains("crop_size"));
}

fn synthetic() -> DataConfig {
    DataConfig {
        dataset: "synthetic".into(),
        synthetic_samples: 64,
        synthetic_classes: 4,
        synthetic_size: 12,
        synthetic_channels: 3,
        ..DataConfig::default()
    }
}

#[test]
fn config_errors_name_the_key() {
    let mut c = synthetic();
    c.mean = Some(vec![0.5]);
    assert!(open(&c).unwrap_err().to_string().contains("data.mean"));
    c.mean = Some(vec![0.1, 0.2, 0.3]);
    c.std = Some(vec![0.1, 0.0, 0.3]);
    assert!(open(&c).unwrap_err().to_string().contains("data.std"));
    c.std = None;
    let ds = open(&c).unwrap();
    assert_eq!(ds.info.mean, [0.1, 0.2, 0.3]);
    assert_eq!(ds.info.std, [0.25; 3]);
    c.augment.crop_size = Some(40);
    let e = open(&c).unwrap_err().to_string();
    assert!(e.contains("data.augment") && e.contains("40x40 crop"), "{e}");
    let e = open(&DataConfig { dataset: "cifar-11".into(), ..DataConfig::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.dataset") && e.contains("cifar10, cifar100"), "{e}");
    let e = open(&DataConfig {
        dataset: "cifar10".into(),
        dir: Some("no/such/dir".into()),
        ..DataConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no/such/dir") && e.contains("data fetch"), "{e}");
}

#[test]
fn limits_and_info() {
    let mut c = synthetic();
    c.train_limit = 10;
    c.test_limit = 3;
    let ds = open(&c).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (10, 3));
    assert!(ds.train.describe().starts_with("first 10 of synthetic train"));
    assert!(ds.train.get(10).is_err());
    assert_eq!(ds.info.num_classes, 4);
    assert_eq!(ds.info.eval_shape, ImageShape::new(3, 12, 12));
}

#[test]
fn imagefolder_info_shapes_and_verify_report() {
    let dir = tempfile::tempdir().unwrap();
    mlaan_data::write_synthetic_imagefolder(dir.path(), 3, 4, 40, 30, 1).unwrap();
    std::fs::write(dir.path().join("train/class_001/broken.jpg"), b"garbage").unwrap();
    let c = DataConfig {
        dataset: "imagefolder".into(),
        dir: Some(dir.path().into()),
        ..DataConfig::default()
    };
    let ds = open(&c).unwrap();
    assert_eq!(ds.info.train_shape, ImageShape::new(3, 224, 224));
    assert_eq!(ds.info.eval_shape, ImageShape::new(3, 224, 224));
    assert_eq!((ds.train.len(), ds.test.len()), (13, 3));
    let report = verify(&c).unwrap();
    assert!(!report.is_ok());
    let text = report.to_string();
    assert!(text.contains("broken.jpg") && text.contains("not a JPEG"), "{text}");
    assert!(text.contains("3x30x40 x12"), "{text}");
    assert_eq!(report.splits[0].label_histogram, [4, 5, 4]);
    std::fs::remove_file(dir.path().join("train/class_001/broken.jpg")).unwrap();
    assert!(verify(&c).unwrap().is_ok());
}

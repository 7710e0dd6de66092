//! Networks as built from plans: every architecture as one module (shapes, parameter counts,
//! torchvision names), split-independent names, heads, decoder, LAM and the EMA update.

use mlaan_core::arch::{ArchSpec, BlockRef, Chw};
use mlaan_core::config::{HeadKind, RunConfig};
use mlaan_core::plan::NetworkPlan;
use mlaan_models::heads::{Decoder, Head};
use mlaan_models::lam::{ema_update, Lam};
use mlaan_models::{LocalNets, Mode};
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};

fn plan(arch: &str, method: &str, k: usize, input: Chw, classes: usize) -> NetworkPlan {
    let mut cfg = RunConfig::default();
    cfg.model.arch = arch.into();
    cfg.model.k = k;
    cfg.method.name = method.parse().unwrap();
    NetworkPlan::new(&cfg, input, classes).unwrap()
}

/// Module `m` of `p`, on the CPU.
fn nets(p: &NetworkPlan, m: usize) -> LocalNets {
    LocalNets::new(
        &p.arch,
        &p.modules[m],
        p.input.c,
        [p.input.h, p.input.w],
        p.num_classes,
        Device::Cpu,
    )
}

/// The whole backbone as one module.
fn whole(arch: &str, input: Chw, classes: usize) -> (NetworkPlan, LocalNets) {
    let p = plan(arch, "e2e", 1, input, classes);
    let n = nets(&p, 0);
    (p, n)
}

fn logits(n: &LocalNets, x: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let h = n.forward(x, Mode::Eval);
        n.classifier.as_ref().expect("one module has fc").forward(&h)
    })
}

fn image(n: i64, c: Chw) -> Tensor {
    Tensor::rand([n, c.c as i64, c.h as i64, c.w as i64], (Kind::Float, Device::Cpu))
}

fn names(n: &LocalNets) -> BTreeMap<String, Vec<i64>> {
    n.state().into_iter().map(|(k, t)| (k, t.size())).collect()
}

const CIFAR: [&str; 7] =
    ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"];
const IMAGENET: [&str; 5] = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"];

#[test]
fn cifar_backbones_have_the_right_logits_and_parameter_counts() {
    tch::manual_seed(0);
    let input = Chw { c: 3, h: 32, w: 32 };
    for arch in CIFAR {
        let (p, n) = whole(arch, input, 10);
        assert_eq!(logits(&n, &image(2, input)).size(), vec![2, 10], "{arch}");
        let count = n.count_params(|_| true);
        assert_eq!(count, p.arch.total_params(input, 10), "{arch}");
        let range = match arch {
            // He et al. 2016 Table 6 (option-A shortcuts; projections add a few thousand).
            "resnet32" => Some(460_000..480_000),
            "resnet110" => Some(1_700_000..1_740_000),
            _ => None,
        };
        if let Some(r) = range {
            assert!(r.contains(&count), "{arch} has {count} parameters");
        }
    }
}

#[test]
fn imagenet_backbones_have_the_right_logits_and_torchvision_counts() {
    tch::manual_seed(0);
    // A small input keeps this fast; the parameter count does not depend on it.
    let input = Chw { c: 3, h: 64, w: 64 };
    // torchvision's resnet18/34/50/101/152 with 1000 classes.
    let torchvision = [11_689_512, 21_797_672, 25_557_032, 44_549_160, 60_192_808];
    for (arch, tv) in IMAGENET.into_iter().zip(torchvision) {
        let (p, n) = whole(arch, input, 1000);
        assert_eq!(logits(&n, &image(2, input)).size(), vec![2, 1000], "{arch}");
        let count = n.count_params(|_| true);
        assert_eq!(count, p.arch.total_params(input, 1000), "{arch}");
        assert_eq!(count, tv, "{arch} differs from torchvision");
    }
}

#[test]
fn one_and_three_input_channels_work() {
    tch::manual_seed(0);
    for c in [1, 3] {
        let input = Chw { c, h: 28, w: 28 };
        let (p, n) = whole("resnet20", input, 10);
        assert_eq!(logits(&n, &image(3, input)).size(), vec![3, 10]);
        assert_eq!(n.count_params(|_| true), p.arch.total_params(input, 10));
        assert_eq!(names(&n)["conv1.weight"], vec![16, c as i64, 3, 3]);
        let input = Chw { c, h: 64, w: 64 };
        let (_, n) = whole("resnet18", input, 7);
        assert_eq!(logits(&n, &image(1, input)).size(), vec![1, 7]);
        assert_eq!(names(&n)["conv1.weight"], vec![64, c as i64, 7, 7]);
    }
}

#[test]
fn parameter_names_are_torchvision_style() {
    let input = Chw { c: 3, h: 32, w: 32 };
    let (_, n) = whole("resnet32", input, 10);
    let got = names(&n);
    for (name, shape) in [
        ("conv1.weight", vec![16, 3, 3, 3]),
        ("bn1.weight", vec![16]),
        ("bn1.running_var", vec![16]),
        ("layer1.0.conv1.weight", vec![16, 16, 3, 3]),
        ("layer1.4.bn2.running_mean", vec![16]),
        ("layer2.0.downsample.0.weight", vec![32, 16, 1, 1]),
        ("layer2.0.downsample.1.running_mean", vec![32]),
        ("layer3.4.conv2.weight", vec![64, 64, 3, 3]),
        ("fc.weight", vec![10, 64]),
        ("fc.bias", vec![10]),
    ] {
        assert_eq!(got.get(name), Some(&shape), "{name}");
    }
    assert!(!got.contains_key("layer1.0.downsample.0.weight"));
    assert!(
        got.keys().all(|k| k == "fc.weight"
            || k == "fc.bias"
            || k.starts_with("conv1.")
            || k.starts_with("bn1.")
            || k.starts_with("layer")),
        "{got:?}"
    );
    let (_, n) = whole("resnet50", Chw { c: 3, h: 64, w: 64 }, 1000);
    let got = names(&n);
    for (name, shape) in [
        ("layer1.0.downsample.0.weight", vec![256, 64, 1, 1]),
        ("layer1.0.conv3.weight", vec![256, 64, 1, 1]),
        ("layer4.2.bn3.running_var", vec![2048]),
        ("fc.weight", vec![1000, 2048]),
    ] {
        assert_eq!(got.get(name), Some(&shape), "{name}");
    }
}

/// Backbone tensors (parameters and buffers) of every module of a plan, by name.
fn backbone_union(p: &NetworkPlan) -> BTreeMap<String, Vec<i64>> {
    let mut all = BTreeMap::new();
    for m in 0..p.k() {
        for (name, shape) in names(&nets(p, m)) {
            if name.starts_with("aux.") || name.starts_with("ema.") {
                continue;
            }
            assert!(all.insert(name.clone(), shape).is_none(), "{name} is in two modules");
        }
    }
    all
}

#[test]
fn backbone_names_do_not_depend_on_the_split() {
    for (arch, input) in
        [("resnet32", Chw { c: 3, h: 32, w: 32 }), ("resnet18", Chw { c: 3, h: 64, w: 64 })]
    {
        let (_, one) = whole(arch, input, 10);
        let one = names(&one);
        for method in ["dgl", "infopro", "mlaan-dgl"] {
            let p = plan(arch, method, 4, input, 10);
            assert_eq!(backbone_union(&p), one, "{arch} {method} K=4");
        }
    }
}

#[test]
fn heads_give_class_scores_for_every_width() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    for (width, side) in [(16, 32), (32, 16), (64, 8)] {
        let h = Tensor::randn([3, width, side, side], (Kind::Float, Device::Cpu));
        for kind in [HeadKind::GapFc, HeadKind::OneConvTwoFc, HeadKind::Dgl] {
            let head = Head::new(&(&root / format!("{kind:?}_{width}")), kind, width as usize, 10);
            for mode in [Mode::Train, Mode::Eval] {
                let y = head.forward(&h, mode);
                assert_eq!(y.size(), vec![3, 10], "{kind:?} width {width}");
            }
        }
    }
}

#[test]
fn decoder_reconstructs_an_image_in_the_unit_interval() {
    // Closed bounds: a float32 sigmoid rounds to exactly 0 or 1 for logits beyond about ±17,
    // which random weights and inputs reach now and then.
    let vs = nn::VarStore::new(Device::Cpu);
    for (width, side, channels) in [(16, 32, 3), (32, 16, 3), (64, 7, 1)] {
        let image = [if channels == 1 { 28 } else { 32 }; 2];
        let dec = Decoder::new(&(vs.root() / format!("dec{width}")), width, channels, image);
        let h = Tensor::randn([2, width as i64, side, side], (Kind::Float, Device::Cpu));
        let y = dec.forward(&h, Mode::Train);
        assert_eq!(y.size(), vec![2, channels as i64, image[0] as i64, image[1] as i64]);
        let (lo, hi) = (y.min().double_value(&[]), y.max().double_value(&[]));
        assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && lo < hi, "{lo} {hi}");
    }
}

#[test]
fn lam_maps_a_module_output_to_the_last_stage() {
    let arch = ArchSpec::from_name("resnet32").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let ema = nn::VarStore::new(Device::Cpu);
    let chain: Vec<_> = [[2, 0], [3, 0], [3, 2], [3, 4]]
        .into_iter()
        .map(|b| arch.block(BlockRef::from(b)).unwrap())
        .collect();
    let lam = Lam::new(&(vs.root() / "aux"), &ema.root(), &arch, &chain);
    assert_eq!(lam.twin_of, ["layer2.0"]);
    assert_eq!(lam.copy_of[3].1, "layer3.4");
    let u = Tensor::randn([2, 16, 32, 32], (Kind::Float, Device::Cpu));
    assert_eq!(lam.forward(&u, Mode::Train).size(), vec![2, 64, 8, 8]);
    // A short chain inside the last stage keeps the resolution.
    let chain = vec![arch.block(BlockRef::new(3, 4)).unwrap()];
    let lam = Lam::new(&(vs.root() / "short"), &ema.root(), &arch, &chain);
    let u = Tensor::randn([2, 64, 8, 8], (Kind::Float, Device::Cpu));
    assert_eq!(lam.forward(&u, Mode::Eval).size(), vec![2, 64, 8, 8]);
}

#[test]
fn ema_update_is_the_convex_combination() {
    let m = 0.9;
    let e0 = Tensor::from_slice(&[1.0f32, 2.0, -3.0, 0.5]);
    let r0 = Tensor::from_slice(&[0.0f32, 4.0, 1.0, 0.5]);
    let e1 = Tensor::from_slice(&[10.0f32, -10.0]).view([2, 1]);
    let r1 = Tensor::from_slice(&[0.0f32, 0.0]).view([2, 1]);
    let pairs = vec![(e0.copy(), r0.copy()), (e1.copy(), r1.copy())];
    ema_update(&pairs, m).unwrap();
    let want0 = [0.9f32, 2.2, -2.6, 0.5];
    let want1 = [9.0f32, -9.0];
    let got0 = Vec::<f32>::try_from(&pairs[0].0).unwrap();
    let got1 = Vec::<f32>::try_from(&pairs[1].0.flatten(0, -1)).unwrap();
    for (g, w) in got0.iter().zip(want0).chain(got1.iter().zip(want1)) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
    // The formula on random tensors, and the real side is untouched.
    let e = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
    let r = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
    let want = &e * 0.995 + &r * 0.005;
    let pairs = vec![(e.copy(), r.copy())];
    ema_update(&pairs, 0.995).unwrap();
    assert!(pairs[0].0.allclose(&want, 1e-6, 1e-6, false));
    assert!(pairs[0].1.equal(&r));
}

/// The multiply-accumulates a ViT block counts as it runs, against the block's formula
/// written out here: per token the qkv (3D²), output (D²) and MLP (2·D·4D) projections, and
/// per sample attention's QKᵀ and its product with V (T²·D each, over all heads).
#[test]
fn vit_block_macs_match_the_formula() {
    use mlaan_models::backbone::Unit;
    use mlaan_models::layers::count_macs;
    for (arch, side) in [("vit-tiny-p4", 32usize), ("vit-w64-d2-h4-p7", 28)] {
        let a = ArchSpec::from_name(arch).unwrap();
        let v = *a.vit().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let unit = Unit::new(&a, &[vs.root() / "b"], &a.blocks()[0]);
        let (d, t) = (v.width as u64, ((side / v.patch) * (side / v.patch) + 1) as u64);
        let n = 3u64;
        let x = Tensor::randn([n as i64, t as i64, d as i64], (Kind::Float, Device::Cpu));
        let (y, macs) = count_macs(|| tch::no_grad(|| unit.forward(&x, Mode::Eval)));
        assert_eq!(y.size(), x.size());
        let formula = n * (t * (3 * d * d + d * d + 2 * d * 4 * d) + 2 * t * t * d);
        assert_eq!(macs, formula, "{arch}");
        // The architecture's own count (plan, placement, GFLOP/s) says the same.
        let shape = Chw { c: v.width, h: t as usize, w: 1 };
        assert_eq!(a.block_macs(&a.blocks()[0], shape) as u64 * n, formula, "{arch}");
    }
}

#[test]
fn vit_and_vgg_backbones_have_the_published_parameter_counts() {
    tch::manual_seed(0);
    // timm's vit_tiny_patch16_224 and torchvision's vgg11_bn, 1000 classes.
    for (arch, count) in [("vit-tiny", 5_717_416), ("vgg11", 132_868_840)] {
        let input = Chw { c: 3, h: 224, w: 224 };
        let (p, n) = whole(arch, input, 1000);
        assert_eq!(n.count_params(|_| true), count, "{arch}");
        assert_eq!(p.arch.total_params(input, 1000), count, "{arch}");
    }
    // Small images, one channel: the logits' shape and the formula's count.
    for (arch, side) in [("vit-tiny-p4", 28), ("vit-w32-d4-h2-p4", 8), ("vgg13-cifar", 28)] {
        let input = Chw { c: 1, h: side, w: side };
        let (p, n) = whole(arch, input, 10);
        assert_eq!(logits(&n, &image(2, input)).size(), vec![2, 10], "{arch}");
        assert_eq!(n.count_params(|_| true), p.arch.total_params(input, 10), "{arch}");
    }
}

#[test]
fn vit_and_vgg_names_do_not_depend_on_the_split() {
    for (arch, input) in [
        ("vit-w32-d4-h2-p4", Chw { c: 3, h: 8, w: 8 }),
        ("vgg11-cifar-w8", Chw { c: 3, h: 16, w: 16 }),
    ] {
        let (_, one) = whole(arch, input, 10);
        let one = names(&one);
        for method in ["dgl", "infopro", "mlaan-dgl", "mlaan-infopro"] {
            let p = plan(arch, method, 4, input, 10);
            assert_eq!(backbone_union(&p), one, "{arch} {method} K=4");
        }
    }
}

#[test]
fn token_heads_and_the_patch_decoder() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    // 28x28 one-channel images in 7x7 patches: 16 patch tokens and the class token.
    let h = Tensor::randn([3, 17, 32], (Kind::Float, Device::Cpu));
    for kind in [HeadKind::ClsFc, HeadKind::MeanFc] {
        let head = Head::new(&(&root / format!("{kind:?}")), kind, 32, 10);
        assert_eq!(head.forward(&h, Mode::Train).size(), vec![3, 10], "{kind:?}");
        // `cls-fc` reads the class token alone, `mean-fc` the patch tokens alone (timm's).
        let other = h.copy();
        let (start, len) = if kind == HeadKind::ClsFc { (1, 16) } else { (0, 1) };
        let _ = other.narrow(1, start, len).fill_(5.0);
        let same = head.forward(&other, Mode::Eval).equal(&head.forward(&h, Mode::Eval));
        assert!(same, "{kind:?} reads tokens it should not");
    }
    let dec = Decoder::patches(&(&root / "dec"), 32, 1, [28, 28], 7);
    let y = dec.forward(&h, Mode::Train);
    assert_eq!(y.size(), vec![3, 1, 28, 28]);
    let (lo, hi) = (y.min().double_value(&[]), y.max().double_value(&[]));
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && lo < hi, "{lo} {hi}");
    // Each patch token decodes to its own patch: changing token 1 (the first patch) changes
    // the top-left 7x7 pixels and nothing else.
    let h2 = h.copy();
    let _ = h2.get(0).get(1).fill_(3.0);
    let diff = (dec.forward(&h2, Mode::Eval) - dec.forward(&h, Mode::Eval)).abs().get(0).get(0);
    let changed = diff.gt(0.0);
    assert!(changed.narrow(0, 0, 7).narrow(1, 0, 7).all().int64_value(&[]) == 1);
    assert_eq!(changed.sum(Kind::Int64).int64_value(&[]), 49);
}

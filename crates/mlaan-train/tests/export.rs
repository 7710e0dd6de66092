//! Exported backbones have exactly the state-dict keys and shapes of the published models:
//! torchvision's ResNets and `vgg*_bn`, timm's `VisionTransformer`. The reference layouts are
//! written here from those libraries' definitions, apart from the code that builds the
//! networks (the ViT and VGG ones compared once, key by key and shape by shape, with the
//! state dicts of timm 1.0.31's `vit_{tiny,small,base}_patch16_224` and torchvision 0.26's
//! `vgg{11,13,16}_bn`).

use mlaan_core::config::RunConfig;
use mlaan_core::plan::ImageSpec;
use mlaan_core::plan::NetworkPlan;
use mlaan_engine::init::build_nets;
use mlaan_train::export::torchvision_state;
use tch::Device;

/// torchvision's `resnet{18,34,50}().state_dict()` keys, from its definition: a 7x7 stem,
/// four layers of basic (2 convs) or bottleneck (3 convs) blocks, a 1x1 projection
/// (`downsample.0` conv, `downsample.1` batch norm) on the first block of each layer whose
/// shape changes, and `fc`.
fn torchvision_keys(blocks: [usize; 4], convs: usize, first_projects: bool) -> Vec<String> {
    let bn = |p: &str| {
        ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
            .map(|s| format!("{p}.{s}"))
            .to_vec()
    };
    let mut k = vec!["conv1.weight".to_string()];
    k.extend(bn("bn1"));
    for (l, &n) in blocks.iter().enumerate() {
        for b in 0..n {
            let p = format!("layer{}.{b}", l + 1);
            for c in 1..=convs {
                k.push(format!("{p}.conv{c}.weight"));
                k.extend(bn(&format!("{p}.bn{c}")));
            }
            if b == 0 && (l > 0 || first_projects) {
                k.push(format!("{p}.downsample.0.weight"));
                k.extend(bn(&format!("{p}.downsample.1")));
            }
        }
    }
    k.extend(["fc.weight".to_string(), "fc.bias".to_string()]);
    k
}

fn exported_keys(arch: &str) -> Vec<(String, Vec<i64>)> {
    exported(arch, ImageSpec { channels: 3, size: [224, 224], classes: 1000 })
}

/// The exported state dict of `arch`, whole, for `image`.
fn exported(arch: &str, image: ImageSpec) -> Vec<(String, Vec<i64>)> {
    let mut cfg = RunConfig::default();
    cfg.model.arch = arch.into();
    cfg.model.k = 1;
    cfg.method.name = "e2e".parse().unwrap();
    let plan = NetworkPlan::new(&cfg, image.chw(), image.classes).unwrap();
    let nets = build_nets(&plan, 0, image, Device::Cpu);
    torchvision_state(&nets.state(), Some(3)).into_iter().map(|(n, t)| (n, t.size())).collect()
}

fn sorted(mut v: Vec<(String, Vec<i64>)>) -> Vec<(String, Vec<i64>)> {
    v.sort();
    v
}

/// timm's `VisionTransformer(img_size, patch_size, in_chans, num_classes, embed_dim, depth,
/// num_heads)` state dict with its defaults (class token, `global_pool="token"`, qkv bias,
/// MLP ratio 4, no register tokens, no layer scale): `(name, shape)`.
fn timm_vit(
    d: i64,
    depth: usize,
    patch: i64,
    side: i64,
    chans: i64,
    classes: i64,
) -> Vec<(String, Vec<i64>)> {
    let tokens = (side / patch) * (side / patch) + 1;
    let mut k: Vec<(String, Vec<i64>)> = vec![
        ("cls_token".into(), vec![1, 1, d]),
        ("pos_embed".into(), vec![1, tokens, d]),
        ("patch_embed.proj.weight".into(), vec![d, chans, patch, patch]),
        ("patch_embed.proj.bias".into(), vec![d]),
    ];
    for b in 0..depth {
        let p = format!("blocks.{b}");
        for (n, s) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![4 * d, d]),
            ("mlp.fc1.bias", vec![4 * d]),
            ("mlp.fc2.weight", vec![d, 4 * d]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            k.push((format!("{p}.{n}"), s));
        }
    }
    k.extend([
        ("norm.weight".into(), vec![d]),
        ("norm.bias".into(), vec![d]),
        ("head.weight".into(), vec![classes, d]),
        ("head.bias".into(), vec![classes]),
    ]);
    k
}

#[test]
fn vit_exports_match_timm_keys_and_shapes() {
    // timm's vit_{tiny,small,base}_patch16_224, and the small-image form at 32x32 with 4x4
    // patches and 10 classes.
    for (arch, d) in [("vit-tiny", 192), ("vit-small", 384), ("vit-base", 768)] {
        let want = timm_vit(d, 12, 16, 224, 3, 1000);
        assert_eq!(want.len(), 152, "{arch}: reference key count");
        assert_eq!(sorted(exported_keys(arch)), sorted(want), "{arch}");
    }
    let image = ImageSpec { channels: 3, size: [32, 32], classes: 10 };
    let want = timm_vit(192, 12, 4, 32, 3, 10);
    assert_eq!(sorted(exported("vit-tiny-p4", image)), sorted(want), "vit-tiny-p4");
}

/// torchvision's `vgg*_bn` state dict, from its `make_layers(cfg, batch_norm=True)`: each
/// number of the configuration a conv (with bias), a batch norm and a ReLU, each `M` a
/// max-pool, one index each in `features`; then `classifier.{0,3,6}` (ImageNet), or the CIFAR
/// form's single linear `classifier`.
fn torchvision_vgg(
    cfg: &[i64],
    chans: i64,
    classes: i64,
    imagenet: bool,
) -> Vec<(String, Vec<i64>)> {
    let mut k = Vec::new();
    let (mut j, mut cin) = (0, chans);
    for &v in cfg {
        if v == 0 {
            j += 1; // M
            continue;
        }
        k.push((format!("features.{j}.weight"), vec![v, cin, 3, 3]));
        k.push((format!("features.{j}.bias"), vec![v]));
        for s in ["weight", "bias", "running_mean", "running_var"] {
            k.push((format!("features.{}.{s}", j + 1), vec![v]));
        }
        k.push((format!("features.{}.num_batches_tracked", j + 1), vec![]));
        (j, cin) = (j + 3, v);
    }
    if imagenet {
        for (i, (o, n)) in [(4096, 512 * 49), (4096, 4096), (classes, 4096)].into_iter().enumerate()
        {
            k.push((format!("classifier.{}.weight", 3 * i), vec![o, n]));
            k.push((format!("classifier.{}.bias", 3 * i), vec![o]));
        }
    } else {
        k.push(("classifier.weight".into(), vec![classes, cin]));
        k.push(("classifier.bias".into(), vec![classes]));
    }
    k
}

#[test]
fn vgg_exports_match_torchvision_keys_and_shapes() {
    const M: i64 = 0;
    let a: &[i64] = &[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M];
    let b: &[i64] = &[64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M];
    let d: &[i64] = &[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M];
    for (arch, cfg, count) in [("vgg11", a, 62), ("vgg13", b, 76), ("vgg16", d, 97)] {
        let want = torchvision_vgg(cfg, 3, 1000, true);
        assert_eq!(want.len(), count, "{arch}: reference key count");
        assert_eq!(sorted(exported_keys(arch)), sorted(want), "{arch}");
    }
    let image = ImageSpec { channels: 1, size: [28, 28], classes: 10 };
    let want = torchvision_vgg(b, 1, 10, false);
    assert_eq!(sorted(exported("vgg13-cifar", image)), sorted(want), "vgg13-cifar");
}

#[test]
fn resnet_exports_match_torchvision_keys() {
    for (arch, blocks, convs, first, count) in [
        ("resnet18", [2, 2, 2, 2], 2, false, 122),
        ("resnet34", [3, 4, 6, 3], 2, false, 218),
        ("resnet50", [3, 4, 6, 3], 3, true, 320),
    ] {
        let got = exported_keys(arch);
        let mut names: Vec<String> = got.iter().map(|(n, _)| n.clone()).collect();
        let mut want = torchvision_keys(blocks, convs, first);
        assert_eq!(want.len(), count, "{arch}: reference key count");
        names.sort();
        want.sort();
        assert_eq!(names, want, "{arch}");
        let shape = |n: &str| got.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(shape("conv1.weight"), [64, 3, 7, 7], "{arch}");
        assert_eq!(shape("bn1.num_batches_tracked"), Vec::<i64>::new(), "{arch}");
        let fc_in = if convs == 3 { 2048 } else { 512 };
        assert_eq!(shape("fc.weight"), [1000, fc_in], "{arch}");
        assert_eq!(shape("layer2.0.downsample.0.weight")[0], if convs == 3 { 512 } else { 128 });
    }
}

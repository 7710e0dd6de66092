//! Exported backbones have exactly torchvision's ResNet state-dict keys and shapes.

use mlaan_core::arch::Chw;
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
    let mut cfg = RunConfig::default();
    cfg.model.arch = arch.into();
    cfg.model.k = 1;
    cfg.method.name = "e2e".parse().unwrap();
    let plan = NetworkPlan::new(&cfg, Chw { c: 3, h: 224, w: 224 }, 1000).unwrap();
    let image = ImageSpec { channels: 3, size: [224, 224], classes: 1000 };
    let nets = build_nets(&plan, 0, image, Device::Cpu);
    torchvision_state(&nets.state(), Some(3)).into_iter().map(|(n, t)| (n, t.size())).collect()
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

//! AugLocal's auxiliary networks against the official code's (`ChenxiangMA/AugLocal`, commit
//! 98c90d6): the tables below were taken by running its constructors (`networks/resnet.py`,
//! `exp_imagenet/networks/resnet.py`, `exp_imagenet/networks/vgg.py`) and recording each `AuxNetwork`'s `aux_layer_index` and
//! blocks; they are literal transcriptions, not computed here. Notation: `(stage,index)` of
//! the backbone block each auxiliary block is shaped after, then each auxiliary block as
//! `in>out`, `s` stride and `p` for a projection shortcut.

use mlaan_core::arch::{Backbone, Chw, Family};
use mlaan_core::config::{Method, RunConfig};
use mlaan_core::plan::{NetworkPlan, ObjectiveSpec, TermKind};
use mlaan_core::split::SplitSpec;

/// The official README's ResNet-32 run: `--local_module_num 16 --aux_net_depth 2 --pyramid
/// --pyramid_coeff 0.5`, which trains 16 − 2 = 14 modules.
const RESNET32_K14_D2: &[&str] = &[
    "0: (2,2),(3,4) | 16>32s2p 32>64s2p",
    "1: (2,2),(3,4) | 16>32s2p 32>64s2p",
    "2: (2,2),(3,4) | 16>32s2p 32>64s2p",
    "3: (2,3),(3,4) | 16>32s2p 32>64s2p",
    "4: (2,4),(3,4) | 16>32s2p 32>64s2p",
    "5: (2,4),(3,4) | 16>32s2p 32>64s2p",
    "6: (2,4),(3,4) | 32>32s1 32>64s2p",
    "7: (3,0),(3,4) | 32>64s2p 64>64s1",
    "8: (3,1),(3,4) | 32>64s2p 64>64s1",
    "9: (3,1),(3,4) | 32>64s2p 64>64s1",
    "10: (3,1),(3,4) | 32>64s2p 64>64s1",
    "11: (3,2),(3,4) | 64>64s1 64>64s1",
    "12: (3,3),(3,4) | 64>64s1 64>64s1",
];

/// The official README's ResNet-110 run: `--local_module_num 55 --aux_net_depth 3 --pyramid
/// --pyramid_coeff 0.5`, 52 modules. Module 25's depth is exactly 2.5, which Python rounds to 2.
const RESNET110_K52_D3: &[&str] = &[
    "0: (1,17),(2,17),(3,17) | 16>16s1 16>32s2p 32>64s2p",
    "1: (2,0),(2,17),(3,17) | 16>32s2p 32>32s1 32>64s2p",
    "2: (2,0),(3,0),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "3: (2,1),(3,0),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "4: (2,2),(3,0),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "5: (2,2),(3,1),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "6: (2,3),(3,1),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "7: (2,4),(3,1),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "8: (2,4),(3,2),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "9: (2,5),(3,2),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "10: (2,6),(3,2),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "11: (2,6),(3,3),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "12: (2,7),(3,3),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "13: (2,8),(3,3),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "14: (2,8),(3,4),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "15: (2,9),(3,4),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "16: (2,10),(3,4),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "17: (2,10),(3,5),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "18: (2,11),(3,5),(3,17) | 16>32s2p 32>64s2p 64>64s1",
    "19: (2,12),(3,5),(3,17) | 32>32s1 32>64s2p 64>64s1",
    "20: (2,12),(3,6),(3,17) | 32>32s1 32>64s2p 64>64s1",
    "21: (2,13),(3,6),(3,17) | 32>32s1 32>64s2p 64>64s1",
    "22: (2,14),(3,6),(3,17) | 32>32s1 32>64s2p 64>64s1",
    "23: (2,14),(3,7),(3,17) | 32>32s1 32>64s2p 64>64s1",
    "24: (2,15),(3,7),(3,17) | 32>32s1 32>64s2p 64>64s1",
    "25: (3,3),(3,17) | 32>64s2p 64>64s1",
    "26: (3,3),(3,17) | 32>64s2p 64>64s1",
    "27: (3,3),(3,17) | 32>64s2p 64>64s1",
    "28: (3,4),(3,17) | 32>64s2p 64>64s1",
    "29: (3,5),(3,17) | 32>64s2p 64>64s1",
    "30: (3,5),(3,17) | 32>64s2p 64>64s1",
    "31: (3,5),(3,17) | 32>64s2p 64>64s1",
    "32: (3,6),(3,17) | 32>64s2p 64>64s1",
    "33: (3,7),(3,17) | 32>64s2p 64>64s1",
    "34: (3,7),(3,17) | 32>64s2p 64>64s1",
    "35: (3,7),(3,17) | 32>64s2p 64>64s1",
    "36: (3,8),(3,17) | 32>64s2p 64>64s1",
    "37: (3,9),(3,17) | 64>64s1 64>64s1",
    "38: (3,9),(3,17) | 64>64s1 64>64s1",
    "39: (3,9),(3,17) | 64>64s1 64>64s1",
    "40: (3,10),(3,17) | 64>64s1 64>64s1",
    "41: (3,11),(3,17) | 64>64s1 64>64s1",
    "42: (3,11),(3,17) | 64>64s1 64>64s1",
    "43: (3,11),(3,17) | 64>64s1 64>64s1",
    "44: (3,12),(3,17) | 64>64s1 64>64s1",
    "45: (3,13),(3,17) | 64>64s1 64>64s1",
    "46: (3,13),(3,17) | 64>64s1 64>64s1",
    "47: (3,13),(3,17) | 64>64s1 64>64s1",
    "48: (3,14),(3,17) | 64>64s1 64>64s1",
    "49: (3,15),(3,17) | 64>64s1 64>64s1",
    "50: (3,15),(3,17) | 64>64s1 64>64s1",
];

/// The official ImageNet run (`exp_imagenet/run.sh`): ResNet-34, 17 modules, depth 4, no
/// pyramid; from module 13 on fewer than 4 layers are left and all of them are taken.
const RESNET34_K17_D4: &[&str] = &[
    "0: (2,0),(3,0),(3,4),(4,2) | 64>128s2p 128>256s2p 256>256s1 256>512s2p",
    "1: (2,1),(3,0),(3,4),(4,2) | 64>128s2p 128>256s2p 256>256s1 256>512s2p",
    "2: (2,2),(3,1),(3,4),(4,2) | 64>128s2p 128>256s2p 256>256s1 256>512s2p",
    "3: (2,2),(3,2),(3,5),(4,2) | 64>128s2p 128>256s2p 256>256s1 256>512s2p",
    "4: (2,3),(3,2),(3,5),(4,2) | 128>128s1 128>256s2p 256>256s1 256>512s2p",
    "5: (3,0),(3,2),(3,5),(4,2) | 128>256s2p 256>256s1 256>256s1 256>512s2p",
    "6: (3,0),(3,3),(4,0),(4,2) | 128>256s2p 256>256s1 256>512s2p 512>512s1",
    "7: (3,1),(3,4),(4,0),(4,2) | 128>256s2p 256>256s1 256>512s2p 512>512s1",
    "8: (3,2),(3,4),(4,0),(4,2) | 256>256s1 256>256s1 256>512s2p 512>512s1",
    "9: (3,3),(3,4),(4,0),(4,2) | 256>256s1 256>256s1 256>512s2p 512>512s1",
    "10: (3,4),(3,5),(4,0),(4,2) | 256>256s1 256>256s1 256>512s2p 512>512s1",
    "11: (3,4),(4,0),(4,1),(4,2) | 256>256s1 256>512s2p 512>512s1 512>512s1",
    "12: (3,5),(4,0),(4,1),(4,2) | 256>256s1 256>512s2p 512>512s1 512>512s1",
    "13: (4,0),(4,1),(4,2) | 256>512s2p 512>512s1 512>512s1",
    "14: (4,1),(4,2) | 512>512s1 512>512s1",
    "15: (4,2) | 512>512s1",
];

/// The official ImageNet VGG-13 code (`--arch vgg --net vgg13 --local_module_num 10`; the
/// repository gives no depth for it, so depth 4, no pyramid). Its layers are the ten conv
/// layers, (1,0) … (5,1); `s2` is the max-pool the official network puts in front of a conv
/// layer whose width differs from its input's, none elsewhere.
const VGG13_K10_D4: &[&str] = &[
    "0: (2,0),(3,0),(4,1),(5,1) | 64>128s2 128>256s2 256>512s2 512>512s1",
    "1: (2,1),(3,1),(4,1),(5,1) | 64>128s2 128>256s2 256>512s2 512>512s1",
    "2: (3,0),(4,0),(4,1),(5,1) | 128>256s2 256>512s2 512>512s1 512>512s1",
    "3: (3,0),(4,0),(5,0),(5,1) | 128>256s2 256>512s2 512>512s1 512>512s1",
    "4: (3,1),(4,0),(5,0),(5,1) | 256>256s1 256>512s2 512>512s1 512>512s1",
    "5: (4,0),(4,1),(5,0),(5,1) | 256>512s2 512>512s1 512>512s1 512>512s1",
    "6: (4,1),(5,0),(5,1) | 512>512s1 512>512s1 512>512s1",
    "7: (5,0),(5,1) | 512>512s1 512>512s1",
    "8: (5,1) | 512>512s1",
];

/// `run.sh`'s other CIFAR depths (pyramid 0.5), as module, depth and chosen layer numbers
/// (0 = stem, then the blocks in order).
const RESNET32_K15_D1: &[&str] = &[
    "L0 d1 [15]; L1 d1 [15]; L2 d1 [15]; L3 d1 [15];",
    "L4 d1 [15]; L5 d1 [15]; L6 d1 [15]; L7 d1 [15];",
    "L8 d1 [15]; L9 d1 [15]; L10 d1 [15]; L11 d1 [15];",
    "L12 d1 [15]; L13 d1 [15];",
];
const RESNET32_K13_D3: &[&str] = &[
    "L0 d3 [5, 10, 15]; L1 d3 [6, 10, 15]; L2 d3 [6, 11, 15]; L3 d3 [7, 11, 15];",
    "L4 d3 [8, 11, 15]; L5 d3 [8, 12, 15]; L6 d2 [10, 15]; L7 d2 [11, 15];",
    "L8 d2 [12, 15]; L9 d2 [12, 15]; L10 d2 [12, 15]; L11 d2 [13, 15];",
];
const RESNET32_K11_D5: &[&str] = &[
    "L0 d5 [3, 6, 9, 12, 15]; L1 d5 [4, 7, 9, 12, 15]; L2 d5 [5, 7, 10, 12, 15]; L3 d4 [6, 9, 12, 15];",
    "L4 d4 [7, 10, 12, 15]; L5 d4 [8, 10, 12, 15]; L6 d4 [8, 10, 13, 15]; L7 d3 [10, 12, 15];",
    "L8 d3 [10, 13, 15]; L9 d3 [11, 13, 15];",
];
const RESNET110_K50_D5: &[&str] = &[
    "L0 d5 [11, 22, 32, 43, 54]; L1 d5 [12, 22, 33, 43, 54]; L2 d5 [12, 23, 33, 44, 54]; L3 d5 [13, 23, 34, 44, 54];",
    "L4 d5 [14, 24, 34, 44, 54]; L5 d5 [15, 25, 34, 44, 54]; L6 d5 [16, 25, 35, 44, 54]; L7 d5 [16, 26, 35, 45, 54];",
    "L8 d5 [17, 26, 36, 45, 54]; L9 d5 [18, 27, 36, 45, 54]; L10 d5 [19, 28, 36, 45, 54]; L11 d5 [20, 28, 37, 45, 54];",
    "L12 d4 [22, 33, 44, 54]; L13 d4 [23, 34, 44, 54]; L14 d4 [24, 34, 44, 54]; L15 d4 [25, 34, 44, 54];",
    "L16 d4 [26, 35, 44, 54]; L17 d4 [26, 36, 45, 54]; L18 d4 [27, 36, 45, 54]; L19 d4 [28, 36, 45, 54];",
    "L20 d4 [28, 37, 46, 54]; L21 d4 [29, 38, 46, 54]; L22 d4 [30, 38, 46, 54]; L23 d4 [31, 38, 46, 54];",
    "L24 d4 [32, 39, 46, 54]; L25 d4 [32, 40, 47, 54]; L26 d4 [33, 40, 47, 54]; L27 d4 [34, 40, 47, 54];",
    "L28 d4 [34, 41, 48, 54]; L29 d4 [35, 42, 48, 54]; L30 d4 [36, 42, 48, 54]; L31 d4 [37, 42, 48, 54];",
    "L32 d4 [38, 43, 48, 54]; L33 d4 [38, 44, 49, 54]; L34 d4 [39, 44, 49, 54]; L35 d4 [40, 44, 49, 54];",
    "L36 d4 [40, 45, 50, 54]; L37 d3 [43, 48, 54]; L38 d3 [43, 49, 54]; L39 d3 [44, 49, 54];",
    "L40 d3 [45, 49, 54]; L41 d3 [45, 50, 54]; L42 d3 [46, 50, 54]; L43 d3 [47, 50, 54];",
    "L44 d3 [47, 51, 54]; L45 d3 [48, 51, 54]; L46 d3 [49, 51, 54]; L47 d3 [49, 52, 54];",
    "L48 d3 [50, 52, 54];",
];

fn plan(
    arch: &str,
    k: usize,
    depth: usize,
    pyramid: f64,
    image: usize,
    classes: usize,
) -> NetworkPlan {
    let mut cfg = RunConfig::default();
    cfg.model.arch = arch.into();
    cfg.model.k = k;
    cfg.model.split = SplitSpec::Named("per-layer".into());
    cfg.method.name = Method::Auglocal;
    cfg.method.auglocal.depth = depth;
    cfg.method.auglocal.pyramid = pyramid;
    cfg.validate().unwrap();
    NetworkPlan::new(&cfg, Chw { c: 3, h: image, w: image }, classes).unwrap()
}

/// Each module's auxiliary network in the tables' notation, and the checks every one obeys.
fn rows(p: &NetworkPlan) -> Vec<String> {
    let k = p.k();
    let last = &p.modules[k - 1];
    assert_eq!(last.terms.len(), 1);
    assert_eq!((last.terms[0].kind, last.terms[0].reach), (TermKind::Final, 0));
    p.modules[..k - 1]
        .iter()
        .map(|m| {
            assert_eq!(m.terms.len(), 1, "module {}", m.index);
            let t = &m.terms[0];
            assert_eq!((t.kind, t.weight, t.reach), (TermKind::Independent, 1.0, 0));
            let ObjectiveSpec::AugLocal(net) = &t.objective else { panic!("{:?}", t.objective) };
            assert_eq!(net.in_channels, m.output.c, "it reads the module's output");
            assert_eq!(
                net.features,
                p.arch.feature_channels(),
                "it ends at the last layer's width"
            );
            // A batch norm before the classifier at depth 1, in the CIFAR code only.
            let cifar =
                matches!(&p.arch.backbone, Backbone::ResNet(r) if r.family == Family::Cifar);
            assert_eq!(net.batch_norm, net.depth <= 1 && cifar);
            let layers: Vec<String> =
                net.layers.iter().map(|b| format!("({},{})", b.stage, b.index)).collect();
            let blocks: Vec<String> = net
                .blocks
                .iter()
                .map(|b| {
                    let proj = if b.projection { "p" } else { "" };
                    format!("{}>{}s{}{proj}", b.in_channels, b.out_channels, b.stride)
                })
                .collect();
            format!("{}: {} | {}", m.index, layers.join(","), blocks.join(" "))
        })
        .collect()
}

/// `L<module> d<depth> [<layer numbers>]` of every module, from the plan.
fn layer_numbers(p: &NetworkPlan) -> Vec<String> {
    let number: std::collections::HashMap<_, _> =
        p.arch.blocks().iter().enumerate().map(|(j, b)| (b.at, j + 1)).collect();
    p.modules[..p.k() - 1]
        .iter()
        .map(|m| {
            let ObjectiveSpec::AugLocal(net) = &m.terms[0].objective else { panic!() };
            let n: Vec<String> = net.layers.iter().map(|b| number[b].to_string()).collect();
            format!("L{} d{} [{}]", m.index, net.depth, n.join(", "))
        })
        .collect()
}

fn entries(table: &[&str]) -> Vec<String> {
    table
        .iter()
        .flat_map(|l| l.split(';'))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn resnet32_readme_run() {
    let p = plan("resnet32", 14, 2, 0.5, 32, 10);
    assert_eq!(rows(&p), RESNET32_K14_D2);
    // The last module holds the last three blocks and the classifier.
    let last: Vec<String> =
        p.modules[13].block_refs.iter().map(|b| format!("({},{})", b.stage, b.index)).collect();
    assert_eq!(last, ["(3,2)", "(3,3)", "(3,4)"]);
}

#[test]
fn resnet110_readme_run() {
    let p = plan("resnet110", 52, 3, 0.5, 32, 10);
    assert_eq!(rows(&p), RESNET110_K52_D3);
    assert_eq!(p.modules[51].block_refs.len(), 4);
}

#[test]
fn resnet34_imagenet_run() {
    let p = plan("resnet34", 17, 4, 0.0, 224, 1000);
    assert_eq!(rows(&p), RESNET34_K17_D4);
    assert_eq!(p.modules[16].block_refs.len(), 1);
}

#[test]
fn vgg13_imagenet_code() {
    let p = plan("vgg13", 10, 4, 0.0, 224, 1000);
    assert_eq!(rows(&p), VGG13_K10_D4);
    // No stem: module 0 is the first conv layer, the last module the tenth.
    assert_eq!(p.modules[0].block_refs.len(), 1);
    assert_eq!(p.modules[9].block_refs.len(), 1);
}

/// A ViT has no official AugLocal; the same rule on its blocks (the embedding is layer 0):
/// every block one width, so no pooling and no projection anywhere.
#[test]
fn vit_blocks_follow_the_same_rule() {
    let p = plan("vit-tiny", 13, 2, 0.5, 224, 1000);
    let table: Vec<String> = (0..12)
        .map(|i| {
            // Layer l = i (the embedding is 0), the last is 12: round(l + (12 − l)/2·j).
            let l = i as f64;
            let pick = |j: f64| (l + (12.0 - l) / 2.0 * j).round_ties_even() as usize;
            let chosen: Vec<usize> =
                if i >= 11 { (i + 1..13).collect() } else { vec![pick(1.0), pick(2.0)] };
            let layers: Vec<String> = chosen.iter().map(|&c| format!("(1,{})", c - 1)).collect();
            let units = vec!["192>192s1"; chosen.len()].join(" ");
            format!("{i}: {} | {units}", layers.join(","))
        })
        .collect();
    assert_eq!(rows(&p), table);
}

#[test]
fn run_sh_depths() {
    for (arch, k, depth, table) in [
        ("resnet32", 15, 1, RESNET32_K15_D1),
        ("resnet32", 13, 3, RESNET32_K13_D3),
        ("resnet32", 11, 5, RESNET32_K11_D5),
        ("resnet110", 50, 5, RESNET110_K50_D5),
    ] {
        let p = plan(arch, k, depth, 0.5, 32, 10);
        assert_eq!(layer_numbers(&p), entries(table), "{arch} d = {depth}");
    }
    // Depth 1 before stage 3: one block 16 → 64, stride 2 once (the second halving is lost, as
    // in the official code), and a batch norm before the classifier.
    let p = plan("resnet32", 15, 1, 0.5, 32, 10);
    let ObjectiveSpec::AugLocal(net) = &p.modules[0].terms[0].objective else { panic!() };
    let b = &net.blocks[0];
    assert_eq!(
        (b.in_channels, b.out_channels, b.stride, b.projection, net.batch_norm),
        (16, 64, 2, true, true)
    );
}

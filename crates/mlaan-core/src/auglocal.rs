//! AugLocal's auxiliary networks (Ma et al., ICLR 2024; docs/method.md §3), as its official
//! code builds them. The network's *layers* are the stem, if it has one (layer 0: a ResNet's,
//! a ViT's embedding), then its units (a ResNet's blocks, a ViT's blocks, a VGG's conv layers).
//! Module i, whose last layer is l, gets an auxiliary network of `d_i` layers chosen uniformly
//! among the layers after l, always ending at the last one:
//!
//! ```text
//! d_i = max(1, round(d·(1 − t) + t)),  t = i·c/(K − 2)          (the "pyramid"; c = 0: d_i = d)
//! chosen = [round(l + (n − l − 1)/d_i · j) for j = 1..d_i]      n layers; all after l if d_i ≥ n − 1 − l
//! ```
//!
//! `round` is Python's: halves go to the even neighbour (`f64::round_ties_even`). Each chosen
//! layer becomes a *fresh* unit of that layer's width, not a copy: its input is the previous
//! aux unit's width. On a ResNet it takes stride 2 and a projection shortcut for every
//! doubling of the width (a quadrupling carries its second halving to the next block, and
//! loses it when none follows), whatever the real block at that position does; on a VGG a
//! layer whose width differs from its input's has the 2x2 max-pool in front (the official
//! ImageNet VGG code's rule); a ViT's blocks all have one width and keep it. Nothing is shared
//! with or copied from the backbone. How each network ends (pooling and classifier) depends
//! on the backbone and is the models crate's: for a ResNet global average pooling, a batch
//! norm over the pooled features when `d_i` is 1 (the CIFAR code's; its ImageNet code has
//! none) and one linear classifier.

use crate::arch::{ArchSpec, Backbone, BlockInfo, BlockRef, Family};
use crate::split::Split;
use serde::Serialize;

/// One module's auxiliary network.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuxNetSpec {
    /// The backbone layers its blocks are shaped after, in order.
    pub layers: Vec<BlockRef>,
    /// `d_i`, the depth the pyramid asked for (`layers` may be shorter near the end).
    pub depth: usize,
    /// Its units: widths of those layers, strides and shortcuts adapted (see the module doc).
    #[serde(skip)]
    pub blocks: Vec<BlockInfo>,
    /// Channels of the module output it reads.
    pub in_channels: usize,
    /// Channels its classifier pools (the last chosen layer's).
    pub features: usize,
    /// A batch norm over the pooled features before the classifier (depth 1, CIFAR ResNets).
    pub batch_norm: bool,
}

/// `d_i` of every module 0..K−2: `depth` shrinking linearly by `pyramid` toward the last.
pub fn depths(depth: usize, pyramid: f64, k: usize) -> Vec<usize> {
    (0..k.saturating_sub(1))
        .map(|i| {
            let t = if k > 2 { i as f64 * pyramid / (k - 2) as f64 } else { 0.0 };
            (depth as f64 * (1.0 - t) + t).round_ties_even().max(1.0) as usize
        })
        .collect()
}

/// The layers (0 = the stem where there is one, then the units) chosen after layer `l` of `n`
/// for depth `d`.
pub fn choose(n: usize, l: usize, d: usize) -> Vec<usize> {
    if d >= n - 1 - l {
        return (l + 1..n).collect();
    }
    let step = (n - l - 1) as f64 / d as f64;
    (1..=d).map(|j| (l as f64 + step * j as f64).round_ties_even() as usize).collect()
}

/// The auxiliary network of module `i` of `split`, of depth `d`.
pub fn aux_net(arch: &ArchSpec, split: &Split, i: usize, d: usize) -> AuxNetSpec {
    let units = arch.blocks();
    // The stem, where there is one, is layer 0 and unit u is layer u + offset.
    let offset = usize::from(arch.has_stem());
    let n = units.len() + offset;
    let l = split.module_last_block(i).map_or(0, |u| u + offset);
    let in_channels = match arch.stem_width() {
        Some(stem) if l == 0 => stem,
        _ => units[l - offset].out_channels,
    };
    let resnet = matches!(arch.backbone, Backbone::ResNet(_));
    let mut width = in_channels;
    let mut halvings = 0u32;
    let mut aux = Vec::new();
    for layer in choose(n, l, d) {
        let real = &units[layer - offset];
        let out = real.out_channels;
        let stride = match &arch.backbone {
            Backbone::ResNet(_) => {
                halvings += (out / width).max(1).ilog2();
                if halvings >= 1 {
                    halvings -= 1;
                    2
                } else {
                    1
                }
            }
            Backbone::Vgg(_) if out != width => 2,
            Backbone::Vgg(_) | Backbone::Vit(_) => 1,
        };
        aux.push(BlockInfo {
            at: real.at,
            in_channels: width,
            planes: real.planes,
            out_channels: out,
            stride,
            projection: resnet && (stride != 1 || width != out),
        });
        width = out;
    }
    let cifar_resnet = matches!(&arch.backbone, Backbone::ResNet(r) if r.family == Family::Cifar);
    AuxNetSpec {
        layers: aux.iter().map(|b| b.at).collect(),
        depth: d,
        batch_norm: d <= 1 && cifar_resnet,
        in_channels,
        features: width,
        blocks: aux,
    }
}

/// Every module's auxiliary network but the last's (the last is trained by the final
/// classifier), by module.
pub fn aux_nets(arch: &ArchSpec, split: &Split, depth: usize, pyramid: f64) -> Vec<AuxNetSpec> {
    depths(depth, pyramid, split.k())
        .into_iter()
        .enumerate()
        .map(|(i, d)| aux_net(arch, split, i, d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::SplitSpec;

    #[test]
    fn halves_round_to_even_as_python_does() {
        // ResNet-110, d = 3, c = 0.5, K = 52: module 25 is exactly 2.5.
        let d = depths(3, 0.5, 52);
        assert_eq!((d.len(), d[24], d[25], d[50]), (51, 3, 2, 2));
        // ResNet-32, d = 2, K = 14: the last is exactly 1.5, which rounds to 2.
        assert!(depths(2, 0.5, 14).iter().all(|&x| x == 2));
        assert!(depths(4, 0.0, 17).iter().all(|&x| x == 4), "no pyramid");
        // 16 layers, after layer 2 (stem, (1,0), (1,1)), two: 2 + 6.5 = 8.5 → 8.
        assert_eq!(choose(16, 2, 2), [8, 15]);
        assert_eq!(choose(17, 14, 4), [15, 16], "fewer left than asked: all of them");
    }

    #[test]
    fn blocks_take_the_chosen_widths_and_adapt_their_strides() {
        let arch = ArchSpec::from_name("resnet32").unwrap();
        let split = Split::resolve(&arch, 14, &SplitSpec::Named("per-layer".into())).unwrap();
        // Module 6 ends at (2,0): (2,4) then (3,4), i.e. 32→32 (stride 1) then 32→64 (stride 2).
        let a = aux_net(&arch, &split, 6, 2);
        let shape: Vec<(usize, usize, usize, bool)> = a
            .blocks
            .iter()
            .map(|b| (b.in_channels, b.out_channels, b.stride, b.projection))
            .collect();
        assert_eq!(shape, [(32, 32, 1, false), (32, 64, 2, true)]);
        assert_eq!((a.in_channels, a.features, a.batch_norm), (32, 64, false));
        // Module 0 (the stem, 16 wide) with one block shaped like (3,4): 16→64 is two
        // doublings, one stride 2 here and the other lost (no block follows).
        let one = aux_net(&arch, &split, 0, 1);
        assert_eq!(one.layers, [BlockRef::new(3, 4)]);
        assert_eq!((one.blocks[0].in_channels, one.blocks[0].stride), (16, 2));
        assert!(one.batch_norm);
    }
}

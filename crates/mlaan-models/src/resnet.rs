//! ResNet pieces on named paths: `conv1`/`bn1` for the stem, `layer{s}.{i}.*` for blocks,
//! `fc` for the classifier — the names torchvision uses.

use crate::layers::{global_avg_pool, relu, saved, BatchNorm2d, Conv2d, Linear, Mode};
use mlaan_core::arch::{BlockInfo, BlockKind, Family, ResNetSpec};
use tch::nn;
use tch::Tensor;

/// The stem: conv + BN + ReLU (+ 3x3/2 max-pool for ImageNet).
#[derive(Debug)]
pub struct Stem {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    max_pool: bool,
}

impl Stem {
    pub fn new(root: &nn::Path, arch: &ResNetSpec, in_channels: usize) -> Self {
        let (k, stride) = match arch.family {
            Family::Cifar => (3, 1),
            Family::ImageNet => (7, 2),
        };
        Stem {
            conv1: Conv2d::new(root / "conv1", in_channels, arch.stem_width, k, stride, false),
            bn1: BatchNorm2d::new(root / "bn1", arch.stem_width),
            max_pool: arch.family == Family::ImageNet,
        }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        let y = relu(self.bn1.forward(&self.conv1.forward(x), mode));
        if self.max_pool {
            let (out, indices) = y.max_pool2d_with_indices([3, 3], [2, 2], [1, 1], [1, 1], false);
            saved(&indices);
            out
        } else {
            y
        }
    }
}

/// A residual block (BasicBlock or Bottleneck) with a 1x1 projection shortcut where the shape
/// changes (torchvision's `downsample.0` conv and `downsample.1` BN).
#[derive(Debug)]
pub struct Block {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    /// Build the block described by `info` under `p` (e.g. `layer2.0`).
    pub fn new(p: &nn::Path, kind: BlockKind, info: &BlockInfo) -> Self {
        let shapes: Vec<(usize, usize, usize, usize)> = match kind {
            // (in, out, kernel, stride) of each conv.
            BlockKind::Basic => vec![
                (info.in_channels, info.planes, 3, info.stride),
                (info.planes, info.planes, 3, 1),
            ],
            BlockKind::Bottleneck => vec![
                (info.in_channels, info.planes, 1, 1),
                (info.planes, info.planes, 3, info.stride),
                (info.planes, info.out_channels, 1, 1),
            ],
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(j, (cin, cout, k, s))| {
                (
                    Conv2d::new(p / format!("conv{}", j + 1), cin, cout, k, s, false),
                    BatchNorm2d::new(p / format!("bn{}", j + 1), cout),
                )
            })
            .collect();
        let downsample = info.projection.then(|| {
            let d = p / "downsample";
            (
                Conv2d::new(&d / "0", info.in_channels, info.out_channels, 1, info.stride, false),
                BatchNorm2d::new(&d / "1", info.out_channels),
            )
        });
        Block { convs, downsample }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        let last = self.convs.len() - 1;
        let mut y = x.shallow_clone();
        for (j, (conv, bn)) in self.convs.iter().enumerate() {
            y = bn.forward(&conv.forward(&y), mode);
            if j < last {
                y = relu(y);
            }
        }
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x), mode),
            None => x.shallow_clone(),
        };
        // In place: y is this block's own batch-norm output, which no backward needs.
        y += shortcut;
        relu(y)
    }
}

/// The final classifier: global average pool + linear (`fc`).
#[derive(Debug)]
pub struct Classifier {
    fc: Linear,
}

impl Classifier {
    pub fn new(p: nn::Path, in_features: usize, classes: usize) -> Self {
        Classifier { fc: Linear::new(p, in_features, classes) }
    }
    pub fn forward(&self, h: &Tensor) -> Tensor {
        self.fc.forward(&global_avg_pool(h))
    }
}

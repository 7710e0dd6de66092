//! ResNets as data. CIFAR ResNet-(6n+2) follows He et al. 2016 §4.2 (three stages of n
//! BasicBlocks, widths 16/32/64) with 1x1-conv projection shortcuts where the shape changes, as
//! the InfoPro code does. ImageNet ResNets follow torchvision (7x7 stem + max-pool, four stages).

use super::{BlockInfo, BlockRef, Chw};
use serde::{Deserialize, Serialize};

/// The two residual block designs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of stage width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// CIFAR-style (3x3 stem, 3 stages) or ImageNet-style (7x7 stem + max-pool, 4 stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Cifar,
    ImageNet,
}

/// A ResNet described by its block design, stage depths and widths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResNetSpec {
    pub family: Family,
    pub block: BlockKind,
    pub depths: Vec<usize>,
    pub widths: Vec<usize>,
    pub stem_width: usize,
}

impl ResNetSpec {
    /// `resnet8|14|20|32|44|56|110` (any 6n+2 ≤ 1202) and `resnet18|34|50|101|152`.
    pub fn from_name(name: &str) -> Option<Self> {
        let depth: usize = name.strip_prefix("resnet").and_then(|d| d.parse().ok())?;
        let imagenet = |block, depths: [usize; 4]| ResNetSpec {
            family: Family::ImageNet,
            block,
            depths: depths.to_vec(),
            widths: vec![64, 128, 256, 512],
            stem_width: 64,
        };
        Some(match depth {
            18 => imagenet(BlockKind::Basic, [2, 2, 2, 2]),
            34 => imagenet(BlockKind::Basic, [3, 4, 6, 3]),
            50 => imagenet(BlockKind::Bottleneck, [3, 4, 6, 3]),
            101 => imagenet(BlockKind::Bottleneck, [3, 4, 23, 3]),
            152 => imagenet(BlockKind::Bottleneck, [3, 8, 36, 3]),
            d if d >= 8 && (d - 2) % 6 == 0 && d <= 1202 => {
                let n = (d - 2) / 6;
                ResNetSpec {
                    family: Family::Cifar,
                    block: BlockKind::Basic,
                    depths: vec![n, n, n],
                    widths: vec![16, 32, 64],
                    stem_width: 16,
                }
            }
            _ => return None,
        })
    }

    pub fn describe(&self) -> String {
        let family = match self.family {
            Family::Cifar => "CIFAR ResNet",
            Family::ImageNet => "ImageNet ResNet",
        };
        let block = match self.block {
            BlockKind::Basic => "basic",
            BlockKind::Bottleneck => "bottleneck",
        };
        format!("{family}, {block} blocks, stages {:?}, widths {:?}", self.depths, self.widths)
    }

    /// All blocks in forward order.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        let exp = self.block.expansion();
        let mut in_ch = self.stem_width;
        let mut out = Vec::new();
        for (s, (&n, &w)) in self.depths.iter().zip(&self.widths).enumerate() {
            for i in 0..n {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let out_ch = w * exp;
                out.push(BlockInfo {
                    at: BlockRef::new(s + 1, i),
                    in_channels: in_ch,
                    planes: w,
                    out_channels: out_ch,
                    stride,
                    projection: stride != 1 || in_ch != out_ch,
                });
                in_ch = out_ch;
            }
        }
        out
    }

    pub fn feature_channels(&self) -> usize {
        self.widths[self.widths.len() - 1] * self.block.expansion()
    }

    pub fn stem_output(&self, input: Chw) -> Chw {
        match self.family {
            Family::Cifar => Chw { c: self.stem_width, h: input.h, w: input.w },
            // 7x7/2 conv (pad 3) then 3x3/2 max-pool (pad 1).
            Family::ImageNet => {
                let down = |x: usize| (x.div_ceil(2)).div_ceil(2);
                Chw { c: self.stem_width, h: down(input.h), w: down(input.w) }
            }
        }
    }

    pub fn block_output(&self, b: &BlockInfo, input: Chw) -> Chw {
        Chw { c: b.out_channels, h: input.h.div_ceil(b.stride), w: input.w.div_ceil(b.stride) }
    }

    /// Learnable parameters of the stem (conv + BN affine).
    pub fn stem_params(&self, in_channels: usize) -> usize {
        let k = match self.family {
            Family::Cifar => 3,
            Family::ImageNet => 7,
        };
        in_channels * self.stem_width * k * k + 2 * self.stem_width
    }

    /// Learnable parameters of one block (convs without bias, BN affine).
    pub fn block_params(&self, b: &BlockInfo) -> usize {
        let conv = |i: usize, o: usize, k: usize| i * o * k * k;
        let bn = |c: usize| 2 * c;
        let body = match self.block {
            BlockKind::Basic => {
                conv(b.in_channels, b.planes, 3)
                    + bn(b.planes)
                    + conv(b.planes, b.planes, 3)
                    + bn(b.planes)
            }
            BlockKind::Bottleneck => {
                conv(b.in_channels, b.planes, 1)
                    + bn(b.planes)
                    + conv(b.planes, b.planes, 3)
                    + bn(b.planes)
                    + conv(b.planes, b.out_channels, 1)
                    + bn(b.out_channels)
            }
        };
        let shortcut = if b.projection {
            conv(b.in_channels, b.out_channels, 1) + bn(b.out_channels)
        } else {
            0
        };
        body + shortcut
    }

    /// Multiply-accumulates of one block's forward for one sample (convolutions only).
    pub fn block_macs(&self, b: &BlockInfo, input: Chw) -> usize {
        let out = self.block_output(b, input);
        let hw_in = input.h * input.w;
        let hw_out = out.h * out.w;
        let body = match self.block {
            BlockKind::Basic => {
                b.in_channels * b.planes * 9 * hw_out + b.planes * b.planes * 9 * hw_out
            }
            BlockKind::Bottleneck => {
                b.in_channels * b.planes * hw_in
                    + b.planes * b.planes * 9 * hw_out
                    + b.planes * b.out_channels * hw_out
            }
        };
        let shortcut = if b.projection { b.in_channels * b.out_channels * hw_out } else { 0 };
        body + shortcut
    }

    pub fn stem_macs(&self, input: Chw) -> usize {
        match self.family {
            Family::Cifar => input.c * self.stem_width * 9 * input.h * input.w,
            Family::ImageNet => {
                let h = input.h.div_ceil(2);
                let w = input.w.div_ceil(2);
                input.c * self.stem_width * 49 * h * w
            }
        }
    }
}

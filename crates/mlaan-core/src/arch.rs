//! ResNet architectures as data: which blocks exist, their widths and strides, and what they
//! cost. The model crate builds tensors from this; `plan` and placement reason about it
//! without libtorch.
//!
//! CIFAR ResNet-(6n+2) follows He et al. 2016 §4.2 (three stages of n BasicBlocks, widths
//! 16/32/64) with 1x1-conv projection shortcuts where the shape changes, as the InfoPro code
//! does. ImageNet ResNets follow torchvision (7x7 stem + max-pool, four stages).

use crate::error::PlanError;
use serde::{Deserialize, Serialize};
use std::fmt;

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

/// Address of a block: 1-based stage, 0-based index in the stage. `[0,0]` is the stem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "[usize; 2]", into = "[usize; 2]")]
pub struct BlockRef {
    pub stage: usize,
    pub index: usize,
}

impl BlockRef {
    pub const STEM: BlockRef = BlockRef { stage: 0, index: 0 };
    pub fn new(stage: usize, index: usize) -> Self {
        BlockRef { stage, index }
    }
    pub fn is_stem(self) -> bool {
        self.stage == 0
    }
}

impl From<[usize; 2]> for BlockRef {
    fn from(v: [usize; 2]) -> Self {
        BlockRef::new(v[0], v[1])
    }
}
impl From<BlockRef> for [usize; 2] {
    fn from(b: BlockRef) -> Self {
        [b.stage, b.index]
    }
}
impl fmt::Display for BlockRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{},{}]", self.stage, self.index)
    }
}

/// Shape facts of one residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    pub at: BlockRef,
    pub in_channels: usize,
    /// Width of the inner convolutions.
    pub planes: usize,
    pub out_channels: usize,
    pub stride: usize,
    /// True where the shortcut needs a 1x1 projection (shape changes).
    pub projection: bool,
}

/// Activation shape (channels, height, width) of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chw {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Chw {
    pub fn numel(self) -> usize {
        self.c * self.h * self.w
    }
}

/// A ResNet described by its block design, stage depths and widths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchSpec {
    pub name: String,
    pub family: Family,
    pub block: BlockKind,
    pub depths: Vec<usize>,
    pub widths: Vec<usize>,
    pub stem_width: usize,
}

impl ArchSpec {
    /// `resnet8|14|20|32|44|56|110` (any 6n+2 ≤ 1202) and `resnet18|34|50|101|152`.
    pub fn from_name(name: &str) -> Result<Self, PlanError> {
        let unknown = || PlanError::UnknownArch(name.to_string());
        let depth: usize =
            name.strip_prefix("resnet").and_then(|d| d.parse().ok()).ok_or_else(unknown)?;
        let imagenet = |block, depths: [usize; 4]| ArchSpec {
            name: name.to_string(),
            family: Family::ImageNet,
            block,
            depths: depths.to_vec(),
            widths: vec![64, 128, 256, 512],
            stem_width: 64,
        };
        Ok(match depth {
            18 => imagenet(BlockKind::Basic, [2, 2, 2, 2]),
            34 => imagenet(BlockKind::Basic, [3, 4, 6, 3]),
            50 => imagenet(BlockKind::Bottleneck, [3, 4, 6, 3]),
            101 => imagenet(BlockKind::Bottleneck, [3, 4, 23, 3]),
            152 => imagenet(BlockKind::Bottleneck, [3, 8, 36, 3]),
            d if d >= 8 && (d - 2) % 6 == 0 && d <= 1202 => {
                let n = (d - 2) / 6;
                ArchSpec {
                    name: name.to_string(),
                    family: Family::Cifar,
                    block: BlockKind::Basic,
                    depths: vec![n, n, n],
                    widths: vec![16, 32, 64],
                    stem_width: 16,
                }
            }
            _ => return Err(unknown()),
        })
    }

    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }

    pub fn num_blocks(&self) -> usize {
        self.depths.iter().sum()
    }

    /// All blocks in forward order.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        let exp = self.block.expansion();
        let mut in_ch = self.stem_width;
        let mut out = Vec::with_capacity(self.num_blocks());
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

    /// Position of a block in forward order; `None` for the stem or a block that does not exist.
    pub fn index_of(&self, at: BlockRef) -> Option<usize> {
        if at.stage == 0 || at.stage > self.depths.len() || at.index >= self.depths[at.stage - 1] {
            return None;
        }
        Some(self.depths[..at.stage - 1].iter().sum::<usize>() + at.index)
    }

    pub fn block(&self, at: BlockRef) -> Option<BlockInfo> {
        self.index_of(at).map(|i| self.blocks()[i])
    }

    pub fn last_block(&self) -> BlockRef {
        BlockRef::new(self.depths.len(), self.depths[self.depths.len() - 1] - 1)
    }

    /// Channels of the final feature map (input of the classifier).
    pub fn feature_channels(&self) -> usize {
        self.widths[self.widths.len() - 1] * self.block.expansion()
    }

    /// Shape after the stem for an input image of `input`.
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

    /// Output shape of a block given its input shape.
    pub fn block_output(&self, b: &BlockInfo, input: Chw) -> Chw {
        Chw { c: b.out_channels, h: input.h.div_ceil(b.stride), w: input.w.div_ceil(b.stride) }
    }

    /// Output shape of every block (forward order) for an input image of `input`.
    pub fn block_outputs(&self, input: Chw) -> Vec<Chw> {
        let mut x = self.stem_output(input);
        self.blocks()
            .iter()
            .map(|b| {
                x = self.block_output(b, x);
                x
            })
            .collect()
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

    /// Learnable parameters of the final classifier (linear with bias).
    pub fn classifier_params(&self, num_classes: usize) -> usize {
        self.feature_channels() * num_classes + num_classes
    }

    /// Total learnable parameters of the backbone.
    pub fn total_params(&self, in_channels: usize, num_classes: usize) -> usize {
        self.stem_params(in_channels)
            + self.blocks().iter().map(|b| self.block_params(b)).sum::<usize>()
            + self.classifier_params(num_classes)
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

    /// Multiply-accumulates of the stem for one sample.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cifar_param_counts_match_the_paper() {
        // He et al. 2016 Table 6: ResNet-32 0.46M, ResNet-110 1.7M (option A shortcuts; the
        // projection shortcuts here add ~3k parameters).
        let r32 = ArchSpec::from_name("resnet32").unwrap().total_params(3, 10);
        let r110 = ArchSpec::from_name("resnet110").unwrap().total_params(3, 10);
        assert!((460_000..480_000).contains(&r32), "resnet32 has {r32}");
        assert!((1_700_000..1_740_000).contains(&r110), "resnet110 has {r110}");
    }

    #[test]
    fn imagenet_param_counts_match_torchvision() {
        // torchvision: resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032.
        for (name, n) in
            [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)]
        {
            assert_eq!(ArchSpec::from_name(name).unwrap().total_params(3, 1000), n, "{name}");
        }
    }

    #[test]
    fn block_addressing_round_trips() {
        let a = ArchSpec::from_name("resnet32").unwrap();
        assert_eq!(a.num_blocks(), 15);
        assert_eq!(a.index_of(BlockRef::new(2, 1)), Some(6));
        assert_eq!(a.index_of(BlockRef::new(3, 5)), None);
        assert_eq!(a.index_of(BlockRef::STEM), None);
        assert_eq!(a.last_block(), BlockRef::new(3, 4));
        let b = a.block(BlockRef::new(2, 0)).unwrap();
        assert_eq!((b.in_channels, b.out_channels, b.stride, b.projection), (16, 32, 2, true));
        assert!(!a.block(BlockRef::new(2, 1)).unwrap().projection);
    }

    #[test]
    fn shapes_follow_strides() {
        let a = ArchSpec::from_name("resnet18").unwrap();
        let outs = a.block_outputs(Chw { c: 3, h: 224, w: 224 });
        assert_eq!(outs.last().copied(), Some(Chw { c: 512, h: 7, w: 7 }));
        let c = ArchSpec::from_name("resnet20").unwrap();
        let outs = c.block_outputs(Chw { c: 1, h: 28, w: 28 });
        assert_eq!(outs.last().copied(), Some(Chw { c: 64, h: 7, w: 7 }));
    }

    #[test]
    fn unknown_arch_is_named() {
        let e = ArchSpec::from_name("resnet33").unwrap_err();
        assert!(e.to_string().contains("resnet33"));
        assert!(ArchSpec::from_name("vgg16").is_err());
    }
}

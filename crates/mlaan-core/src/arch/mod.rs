//! Backbones as data: which units a network is made of, their shapes, what they cost and what
//! their parameters are called. The model crate builds tensors from this; the split, the LAM
//! chains, `plan` and placement reason about it without libtorch.
//!
//! Every backbone is a stem (maybe empty), then *units* in stages, then a classifier. A unit
//! is what a split counts and a LAM chain copies: a residual block of a ResNet
//! ([`resnet`]), a transformer block of a ViT ([`vit`]), a conv layer of a VGG ([`vgg`]). A
//! unit is addressed `[stage, index]` (stage from 1, index from 0); `[0,0]` is the stem.

pub mod resnet;
pub mod vgg;
pub mod vit;

pub use resnet::{BlockKind, Family, ResNetSpec};
pub use vgg::{VggForm, VggSpec};
pub use vit::VitSpec;

use crate::error::PlanError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Address of a unit: 1-based stage, 0-based index in the stage. `[0,0]` is the stem.
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

/// Shape facts of one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    pub at: BlockRef,
    pub in_channels: usize,
    /// Width of a ResNet block's inner convolutions; a ViT block's MLP hidden width.
    pub planes: usize,
    pub out_channels: usize,
    /// 2 where the unit halves the resolution (a ResNet stage's first block, the max-pool in
    /// front of a VGG stage's first layer).
    pub stride: usize,
    /// True where a ResNet block's shortcut needs a 1x1 projection (shape changes).
    pub projection: bool,
}

/// Activation shape of one sample: channels, height, width of a feature map; for a ViT's
/// token sequence, `c` the width and `h` the tokens (`w = 1`).
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

/// The kind of network and its own description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Backbone {
    ResNet(ResNetSpec),
    Vit(VitSpec),
    Vgg(VggSpec),
}

/// A named backbone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchSpec {
    pub name: String,
    pub backbone: Backbone,
}

impl ArchSpec {
    /// ResNets (`resnet8|14|20|32|44|56|110`, any 6n+2 ≤ 1202, `resnet18|34|50|101|152`),
    /// ViTs (`vit-tiny|small|base`, `-p{P}` for another patch, `vit-w{W}-d{D}-h{H}-p{P}`) and
    /// VGGs with batch norm (`vgg11|13|16`, `-cifar` for the CIFAR form, `-w{W}` for
    /// narrower stages).
    pub fn from_name(name: &str) -> Result<Self, PlanError> {
        let backbone = if let Some(r) = ResNetSpec::from_name(name) {
            Backbone::ResNet(r)
        } else if let Some(v) = VitSpec::from_name(name) {
            Backbone::Vit(v)
        } else if let Some(v) = VggSpec::from_name(name) {
            Backbone::Vgg(v)
        } else {
            return Err(PlanError::UnknownArch(name.to_string()));
        };
        Ok(ArchSpec { name: name.to_string(), backbone })
    }

    pub fn vit(&self) -> Option<&VitSpec> {
        match &self.backbone {
            Backbone::Vit(v) => Some(v),
            _ => None,
        }
    }

    /// One line for `plan`.
    pub fn describe(&self) -> String {
        match &self.backbone {
            Backbone::ResNet(r) => r.describe(),
            Backbone::Vit(v) => v.describe(),
            Backbone::Vgg(v) => v.describe(),
        }
    }

    /// Whether images of this shape fit the network (a ViT's patches must tile them, a VGG's
    /// pools must leave a pixel).
    pub fn check_input(&self, input: Chw) -> Result<(), PlanError> {
        let checked = match &self.backbone {
            Backbone::ResNet(_) => Ok(()),
            Backbone::Vit(v) => v.check_input(input),
            Backbone::Vgg(v) => v.check_input(input),
        };
        checked.map_err(|reason| PlanError::InvalidInput { arch: self.name.clone(), reason })
    }

    /// Whether the network has a stem before its first unit (a VGG has none).
    pub fn has_stem(&self) -> bool {
        !matches!(self.backbone, Backbone::Vgg(_))
    }

    /// Width of the stem's output (`None` for a VGG, which has no stem).
    pub fn stem_width(&self) -> Option<usize> {
        match &self.backbone {
            Backbone::ResNet(r) => Some(r.stem_width),
            Backbone::Vit(v) => Some(v.width),
            Backbone::Vgg(_) => None,
        }
    }

    /// Units per stage.
    pub fn depths(&self) -> Vec<usize> {
        match &self.backbone {
            Backbone::ResNet(r) => r.depths.clone(),
            Backbone::Vit(v) => vec![v.depth],
            Backbone::Vgg(v) => v.depths.clone(),
        }
    }

    /// Output width of each stage.
    pub fn widths(&self) -> Vec<usize> {
        match &self.backbone {
            Backbone::ResNet(r) => r.widths.iter().map(|w| w * r.block.expansion()).collect(),
            Backbone::Vit(v) => vec![v.width],
            Backbone::Vgg(v) => v.widths.clone(),
        }
    }

    pub fn num_stages(&self) -> usize {
        self.depths().len()
    }

    pub fn num_blocks(&self) -> usize {
        self.depths().iter().sum()
    }

    /// All units in forward order.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        match &self.backbone {
            Backbone::ResNet(r) => r.blocks(),
            Backbone::Vit(v) => v.blocks(),
            Backbone::Vgg(v) => v.blocks(),
        }
    }

    /// Position of a unit in forward order; `None` for the stem or a unit that does not exist.
    pub fn index_of(&self, at: BlockRef) -> Option<usize> {
        let depths = self.depths();
        if at.stage == 0 || at.stage > depths.len() || at.index >= depths[at.stage - 1] {
            return None;
        }
        Some(depths[..at.stage - 1].iter().sum::<usize>() + at.index)
    }

    pub fn block(&self, at: BlockRef) -> Option<BlockInfo> {
        self.index_of(at).map(|i| self.blocks()[i])
    }

    pub fn last_block(&self) -> BlockRef {
        let depths = self.depths();
        BlockRef::new(depths.len(), depths[depths.len() - 1] - 1)
    }

    /// Width of the final features (input of the classifier).
    pub fn feature_channels(&self) -> usize {
        *self.widths().last().expect("every backbone has a stage")
    }

    /// The names under which a unit's parameters live, in the backbone's published naming
    /// (torchvision's `layer2.3`, timm's `blocks.7`, torchvision VGG's `features.14` for the
    /// conv and `features.15` for its batch norm). Copies and twins of the unit use them too.
    pub fn block_prefixes(&self, at: BlockRef) -> Vec<String> {
        match &self.backbone {
            Backbone::ResNet(_) => vec![format!("layer{}.{}", at.stage, at.index)],
            Backbone::Vit(_) => vec![format!("blocks.{}", at.index)],
            Backbone::Vgg(v) => {
                let j = v.feature_index(at);
                vec![format!("features.{j}"), format!("features.{}", j + 1)]
            }
        }
    }

    /// One name for a unit: its first prefix (the name an EMA twin's channel goes by).
    pub fn block_name(&self, at: BlockRef) -> String {
        self.block_prefixes(at).swap_remove(0)
    }

    /// Shape after the stem for an input image of `input`.
    pub fn stem_output(&self, input: Chw) -> Chw {
        match &self.backbone {
            Backbone::ResNet(r) => r.stem_output(input),
            Backbone::Vit(v) => v.stem_output(input),
            Backbone::Vgg(_) => input,
        }
    }

    /// Output shape of a unit given its input shape.
    pub fn block_output(&self, b: &BlockInfo, input: Chw) -> Chw {
        match &self.backbone {
            Backbone::ResNet(r) => r.block_output(b, input),
            Backbone::Vit(_) => input,
            Backbone::Vgg(v) => v.block_output(b, input),
        }
    }

    /// Output shape of every unit (forward order) for an input image of `input`.
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

    /// Learnable parameters of the stem.
    pub fn stem_params(&self, input: Chw) -> usize {
        match &self.backbone {
            Backbone::ResNet(r) => r.stem_params(input.c),
            Backbone::Vit(v) => v.stem_params(input),
            Backbone::Vgg(_) => 0,
        }
    }

    /// Learnable parameters of one unit.
    pub fn block_params(&self, b: &BlockInfo) -> usize {
        match &self.backbone {
            Backbone::ResNet(r) => r.block_params(b),
            Backbone::Vit(v) => v.block_params(),
            Backbone::Vgg(v) => v.block_params(b),
        }
    }

    /// Learnable parameters of the final classifier.
    pub fn classifier_params(&self, num_classes: usize) -> usize {
        match &self.backbone {
            Backbone::ResNet(r) => r.feature_channels() * num_classes + num_classes,
            Backbone::Vit(v) => v.classifier_params(num_classes),
            Backbone::Vgg(v) => v.classifier_params(num_classes),
        }
    }

    /// Total learnable parameters of the backbone for images of `input`.
    pub fn total_params(&self, input: Chw, num_classes: usize) -> usize {
        let mut blocks = self.blocks();
        if let (false, Some(first)) = (self.has_stem(), blocks.first_mut()) {
            first.in_channels = input.c;
        }
        self.stem_params(input)
            + blocks.iter().map(|b| self.block_params(b)).sum::<usize>()
            + self.classifier_params(num_classes)
    }

    /// Multiply-accumulates of one unit's forward for one sample: convolutions; for a ViT
    /// block also the linear projections and attention's two matrix products.
    pub fn block_macs(&self, b: &BlockInfo, input: Chw) -> usize {
        match &self.backbone {
            Backbone::ResNet(r) => r.block_macs(b, input),
            Backbone::Vit(v) => v.block_macs(input),
            Backbone::Vgg(v) => v.block_macs(b, input),
        }
    }

    /// Multiply-accumulates of the stem for one sample.
    pub fn stem_macs(&self, input: Chw) -> usize {
        match &self.backbone {
            Backbone::ResNet(r) => r.stem_macs(input),
            Backbone::Vit(v) => v.stem_macs(input),
            Backbone::Vgg(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(name: &str, input: Chw, classes: usize) -> usize {
        ArchSpec::from_name(name).unwrap().total_params(input, classes)
    }

    #[test]
    fn cifar_param_counts_match_the_paper() {
        // He et al. 2016 Table 6: ResNet-32 0.46M, ResNet-110 1.7M (option A shortcuts; the
        // projection shortcuts here add ~3k parameters).
        let cifar = Chw { c: 3, h: 32, w: 32 };
        let r32 = params("resnet32", cifar, 10);
        let r110 = params("resnet110", cifar, 10);
        assert!((460_000..480_000).contains(&r32), "resnet32 has {r32}");
        assert!((1_700_000..1_740_000).contains(&r110), "resnet110 has {r110}");
    }

    #[test]
    fn imagenet_param_counts_match_torchvision_and_timm() {
        // torchvision: resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032;
        // vgg11_bn 132,868,840; vgg13_bn 133,053,736; vgg16_bn 138,365,992. timm:
        // vit_small_patch16_224 22,050,664.
        let imagenet = Chw { c: 3, h: 224, w: 224 };
        for (name, n) in [
            ("resnet18", 11_689_512),
            ("resnet34", 21_797_672),
            ("resnet50", 25_557_032),
            ("vgg11", 132_868_840),
            ("vgg13", 133_053_736),
            ("vgg16", 138_365_992),
            ("vit-small", 22_050_664),
        ] {
            assert_eq!(params(name, imagenet, 1000), n, "{name}");
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
        assert_eq!(a.block_prefixes(BlockRef::new(2, 1)), ["layer2.1"]);
        let v = ArchSpec::from_name("vit-tiny-p4").unwrap();
        assert_eq!((v.num_blocks(), v.last_block()), (12, BlockRef::new(1, 11)));
        assert_eq!(v.block_name(BlockRef::new(1, 7)), "blocks.7");
        let g = ArchSpec::from_name("vgg13-cifar").unwrap();
        assert_eq!(g.num_blocks(), 10);
        // torchvision vgg13_bn: [64, 64, M, 128, ...]: the third conv is features.7.
        assert_eq!(g.block_prefixes(BlockRef::new(2, 0)), ["features.7", "features.8"]);
        assert!(!g.has_stem() && v.has_stem());
    }

    #[test]
    fn shapes_follow_strides_tokens_and_pools() {
        let a = ArchSpec::from_name("resnet18").unwrap();
        let outs = a.block_outputs(Chw { c: 3, h: 224, w: 224 });
        assert_eq!(outs.last().copied(), Some(Chw { c: 512, h: 7, w: 7 }));
        let c = ArchSpec::from_name("resnet20").unwrap();
        let outs = c.block_outputs(Chw { c: 1, h: 28, w: 28 });
        assert_eq!(outs.last().copied(), Some(Chw { c: 64, h: 7, w: 7 }));
        let v = ArchSpec::from_name("vit-small").unwrap();
        let outs = v.block_outputs(Chw { c: 3, h: 224, w: 224 });
        assert_eq!(outs.last().copied(), Some(Chw { c: 384, h: 197, w: 1 }));
        // 28 → 14 → 7 → 3 → 1, rounding down as torchvision's max-pool.
        let g = ArchSpec::from_name("vgg11-cifar").unwrap();
        let outs = g.block_outputs(Chw { c: 1, h: 28, w: 28 });
        let sides: Vec<usize> = outs.iter().map(|s| s.h).collect();
        assert_eq!(sides, [28, 14, 7, 7, 3, 3, 1, 1]);
        assert_eq!(outs.last().unwrap().c, 512);
    }

    #[test]
    fn vit_block_macs_are_the_projections_and_attention() {
        // vit-tiny at 224: 197 tokens; 12·D² + 2·T·D per token.
        let v = ArchSpec::from_name("vit-tiny").unwrap();
        let t = v.stem_output(Chw { c: 3, h: 224, w: 224 });
        let b = v.blocks()[0];
        assert_eq!(v.block_macs(&b, t), 197 * 12 * 192 * 192 + 2 * 197 * 197 * 192);
        assert_eq!(v.stem_macs(Chw { c: 3, h: 224, w: 224 }), 196 * 192 * 3 * 256);
    }

    #[test]
    fn unknown_arch_is_named() {
        let e = ArchSpec::from_name("resnet33").unwrap_err();
        assert!(e.to_string().contains("resnet33"));
        assert!(ArchSpec::from_name("vgg19").is_err());
        assert!(ArchSpec::from_name("vit-huge").is_err());
    }
}

//! Any backbone as the same three parts — a stem, units, a classifier — built from an
//! [`ArchSpec`] on its published names (torchvision's ResNets and VGGs, timm's ViTs), so that
//! a whole network's parameters are the union of its modules' parameters whatever the split,
//! and a LAM copy or an EMA twin of a unit is built by the same code as the unit.

use crate::layers::Mode;
use crate::{resnet, vgg, vit};
use mlaan_core::arch::{ArchSpec, Backbone, BlockInfo, BlockRef, Chw};
use tch::nn;
use tch::Tensor;

/// `root` extended by a dotted name (`layer2.0` → `root / "layer2" / "0"`).
pub fn path_of<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(root.clone(), |p, c| p / c)
}

/// Where unit `at`'s parameters live in the backbone, one path per name of
/// [`ArchSpec::block_prefixes`].
pub fn real_paths<'a>(root: &nn::Path<'a>, arch: &ArchSpec, at: BlockRef) -> Vec<nn::Path<'a>> {
    arch.block_prefixes(at).iter().map(|n| path_of(root, n)).collect()
}

/// Where a copy of a unit with `n` names lives under `p`: `p` itself for one name, `p.0`,
/// `p.1`, … for several (a VGG layer's conv and batch norm, as in a `Sequential`).
pub fn copy_paths<'a>(p: &nn::Path<'a>, n: usize) -> Vec<nn::Path<'a>> {
    if n == 1 {
        vec![p.clone()]
    } else {
        (0..n).map(|k| p / k).collect()
    }
}

/// What comes before the first unit.
#[derive(Debug)]
pub enum Stem {
    ResNet(resnet::Stem),
    Vit(vit::Embedding),
}

/// One unit: what a split counts and a LAM chain copies.
#[derive(Debug)]
pub enum Unit {
    ResNet(resnet::Block),
    Vit(vit::Block),
    Vgg(vgg::Layer),
}

impl Unit {
    /// Unit `info` of `arch` under `paths` (from [`real_paths`] or [`copy_paths`]).
    pub fn new(arch: &ArchSpec, paths: &[nn::Path], info: &BlockInfo) -> Self {
        match &arch.backbone {
            Backbone::ResNet(r) => Unit::ResNet(resnet::Block::new(&paths[0], r.block, info)),
            Backbone::Vit(v) => Unit::Vit(vit::Block::new(&paths[0], v)),
            Backbone::Vgg(_) => {
                Unit::Vgg(vgg::Layer::new(paths[0].clone(), paths[1].clone(), info))
            }
        }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        match self {
            Unit::ResNet(b) => b.forward(x, mode),
            Unit::Vit(b) => b.forward(x),
            Unit::Vgg(l) => l.forward(x, mode),
        }
    }
}

/// The backbone's own classifier (the last module's).
#[derive(Debug)]
pub enum Classifier {
    ResNet(resnet::Classifier),
    Vit(vit::Classifier),
    Vgg(vgg::Classifier),
}

impl Classifier {
    pub fn new(root: &nn::Path, arch: &ArchSpec, classes: usize) -> Self {
        match &arch.backbone {
            Backbone::ResNet(r) => Classifier::ResNet(resnet::Classifier::new(
                root / "fc",
                r.feature_channels(),
                classes,
            )),
            Backbone::Vit(v) => Classifier::Vit(vit::Classifier::new(root, v, classes)),
            Backbone::Vgg(v) => Classifier::Vgg(vgg::Classifier::new(root, v, classes)),
        }
    }

    /// The names its parameters start with (`fc`; `norm`, `head`; `classifier`).
    pub fn prefixes(arch: &ArchSpec) -> &'static [&'static str] {
        match &arch.backbone {
            Backbone::ResNet(_) => &["fc"],
            Backbone::Vit(_) => &["norm", "head"],
            Backbone::Vgg(_) => &["classifier"],
        }
    }

    pub fn forward(&self, h: &Tensor) -> Tensor {
        match self {
            Classifier::ResNet(c) => c.forward(h),
            Classifier::Vit(c) => c.forward(h),
            Classifier::Vgg(c) => c.forward(h),
        }
    }
}

/// The part of the backbone one local module owns: maybe the stem, a run of units.
#[derive(Debug)]
pub struct BackbonePart {
    pub stem: Option<Stem>,
    pub blocks: Vec<Unit>,
}

impl BackbonePart {
    /// The stem when `with_stem` (for images of `input`), and `blocks`.
    pub fn new(
        root: &nn::Path,
        arch: &ArchSpec,
        input: Chw,
        with_stem: bool,
        blocks: &[BlockInfo],
    ) -> Self {
        let stem = match &arch.backbone {
            _ if !with_stem => None,
            Backbone::ResNet(r) => Some(Stem::ResNet(resnet::Stem::new(root, r, input.c))),
            Backbone::Vit(v) => {
                Some(Stem::Vit(vit::Embedding::new(root, v, input.c, v.tokens(input))))
            }
            Backbone::Vgg(_) => None,
        };
        BackbonePart {
            stem,
            blocks: blocks
                .iter()
                .map(|b| Unit::new(arch, &real_paths(root, arch, b.at), b))
                .collect(),
        }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        let mut h = match &self.stem {
            Some(Stem::ResNet(stem)) => stem.forward(x, mode),
            Some(Stem::Vit(embed)) => embed.forward(x),
            None => x.shallow_clone(),
        };
        for b in &self.blocks {
            h = b.forward(&h, mode);
        }
        h
    }
}

//! Networks of mlaan-pipe, built with tch on named paths so that every parameter has a stable,
//! readable name: the one the ecosystem's loaders expect (`layer2.3.conv1.weight` as
//! torchvision's ResNets, `blocks.7.attn.qkv.weight` as timm's ViTs, `features.14.weight` as
//! torchvision's VGGs).
//!
//! - [`backbone`]: any backbone as a stem, units and a classifier, built as the slice of units
//!   one local module owns.
//! - [`resnet`]: CIFAR ResNet-(6n+2) (He et al., 2016, §4.2) and ImageNet ResNets (torchvision).
//! - [`vit`]: Vision Transformers (Dosovitskiy et al., 2021) in timm's form.
//! - [`vgg`]: VGG with batch norm (Simonyan & Zisserman, 2015), torchvision's and the CIFAR form.
//! - [`heads`]: auxiliary classifiers (`gap-fc`, InfoPro's `1c2f`, the DGL paper's deeper head)
//!   and InfoPro's decoder (Wang et al., ICLR 2021).
//! - [`lam`]: MLAAN's leap augmented modules with EMA twins (Zhang et al., AAAI 2025).
//! - [`losses`]: cross-entropy, BCE reconstruction, supervised-contrastive (Khosla et al., 2020).
//! - [`module`]: everything one local module owns, built from a `ModuleSpec`.

pub mod backbone;
pub mod heads;
pub mod lam;
pub mod layers;
pub mod losses;
pub mod module;
pub mod resnet;
pub mod vgg;
pub mod vit;

pub use layers::Mode;
pub use module::{LocalNets, Objective};

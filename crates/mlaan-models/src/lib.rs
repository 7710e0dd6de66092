//! Networks of mlaan-pipe, built with tch on named paths so that every parameter has a stable,
//! readable name (`layer2.3.conv1.weight`, torchvision's convention).
//!
//! - [`resnet`]: CIFAR ResNet-(6n+2) (He et al., 2016, §4.2) and ImageNet ResNets (torchvision),
//!   built as the slice of blocks one local module owns.
//! - [`heads`]: auxiliary classifiers (`gap-fc`, InfoPro's `1c2f`, the DGL paper's deeper head)
//!   and InfoPro's decoder (Wang et al., ICLR 2021).
//! - [`lam`]: MLAAN's leap augmented modules with EMA twins (Zhang et al., AAAI 2025).
//! - [`losses`]: cross-entropy, BCE reconstruction, supervised-contrastive (Khosla et al., 2020).
//! - [`module`]: everything one local module owns, built from a `ModuleSpec`.

pub mod heads;
pub mod lam;
pub mod layers;
pub mod losses;
pub mod module;
pub mod resnet;

pub use layers::Mode;
pub use module::{LocalNets, Objective};

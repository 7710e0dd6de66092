//! VGG with batch normalisation (Simonyan & Zisserman, ICLR 2015; torchvision's `vgg*_bn`) as
//! data. Five stages of 3x3 conv layers (conv with bias → batch norm → ReLU), a 2x2 max-pool
//! between stages. The unit of a split and of a LAM chain is one conv layer, `[stage, index]`;
//! the max-pool in front of stages 2–5 belongs to the stage's first layer, as a ResNet's
//! down-sampling belongs to its stage's first block, so a chain that crosses a stage goes
//! through its first layer. VGG has no stem: module 0 starts with the first conv layer.
//!
//! Two forms: `Imagenet` is torchvision's (the last max-pool, an adaptive average pool to
//! 7x7, then Linear(512·49, 4096), ReLU, Linear(4096, 4096), ReLU, Linear(4096, classes));
//! `Cifar` has one linear classifier after the last pool (as the CIFAR VGGs local-learning
//! papers train), with that pool taken over the whole map, which at 32x32 is the 2x2 max-pool
//! itself and lets 28x28 images through.

use super::{BlockInfo, BlockRef, Chw};
use serde::Serialize;

/// torchvision's configurations A, B and D: conv layers per stage at widths 64..512.
const CONFIGS: [(usize, [usize; 5]); 3] =
    [(11, [1, 1, 2, 2, 2]), (13, [2; 5]), (16, [2, 2, 3, 3, 3])];

/// The classifier after the conv stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VggForm {
    /// torchvision's: average pool to 7x7 and a three-layer MLP 4096 wide.
    ImageNet,
    /// One linear layer on the pooled 1x1 map.
    Cifar,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VggSpec {
    /// Conv layers per stage.
    pub depths: Vec<usize>,
    /// Channels of each stage.
    pub widths: Vec<usize>,
    pub form: VggForm,
    /// Hidden width of the ImageNet classifier.
    pub hidden: usize,
}

impl VggSpec {
    /// `vgg11|13|16` (torchvision's `vgg*_bn`), `vgg11|13|16-cifar`, and either with `-w{W}`
    /// for stage widths W, 2W, 4W, 8W, 8W instead of 64..512 (small networks for tests).
    pub fn from_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("vgg")?;
        let (depth, mut rest) = rest.split_at(rest.find('-').unwrap_or(rest.len()));
        let depth: usize = depth.parse().ok()?;
        let depths = CONFIGS.iter().find(|(d, _)| *d == depth)?.1.to_vec();
        let mut form = VggForm::ImageNet;
        if let Some(r) = rest.strip_prefix("-cifar") {
            form = VggForm::Cifar;
            rest = r;
        }
        let base = match rest {
            "" => 64,
            r => r.strip_prefix("-w")?.parse().ok().filter(|&w| w > 0)?,
        };
        let widths = [1, 2, 4, 8, 8].map(|m| m * base).to_vec();
        Some(VggSpec { depths, widths, form, hidden: 4096 })
    }

    pub fn describe(&self) -> String {
        let form = match self.form {
            VggForm::ImageNet => "ImageNet form: average pool to 7x7, MLP 4096-4096",
            VggForm::Cifar => "CIFAR form: one linear classifier after the last pool",
        };
        format!(
            "VGG with batch norm, conv layers per stage {:?}, widths {:?}, {form}",
            self.depths, self.widths
        )
    }

    /// Every pool halves the map (rounding down, as torchvision's): the four between stages
    /// must leave at least one pixel, and the ImageNet form's own last pool needs two.
    pub fn check_input(&self, input: Chw) -> Result<(), String> {
        let least = match self.form {
            VggForm::Cifar => 16,
            VggForm::ImageNet => 32,
        };
        if input.h < least || input.w < least {
            return Err(format!(
                "{}x{} images are too small: its max-pools need at least {least}x{least}",
                input.h, input.w
            ));
        }
        Ok(())
    }

    /// Every conv layer in forward order. The first takes the image: 3 channels here, as
    /// torchvision's; a plan for other images sets its own (`NetworkPlan::new`).
    pub fn blocks(&self) -> Vec<BlockInfo> {
        let mut in_ch = 3;
        let mut out = Vec::new();
        for (s, (&n, &w)) in self.depths.iter().zip(&self.widths).enumerate() {
            for i in 0..n {
                let pooled = s > 0 && i == 0;
                out.push(BlockInfo {
                    at: BlockRef::new(s + 1, i),
                    in_channels: in_ch,
                    planes: w,
                    out_channels: w,
                    stride: if pooled { 2 } else { 1 },
                    projection: false,
                });
                in_ch = w;
            }
        }
        out
    }

    /// The index of a layer's conv in torchvision's `features` (its batch norm is the next):
    /// three entries (conv, batch norm, ReLU) per layer and one max-pool after each stage.
    pub fn feature_index(&self, at: BlockRef) -> usize {
        let before: usize = self.depths[..at.stage - 1].iter().sum::<usize>() + at.index;
        3 * before + (at.stage - 1)
    }

    pub fn block_output(&self, b: &BlockInfo, input: Chw) -> Chw {
        Chw { c: b.out_channels, h: input.h / b.stride, w: input.w / b.stride }
    }

    /// Conv (weight and bias) and batch norm (affine).
    pub fn block_params(&self, b: &BlockInfo) -> usize {
        b.in_channels * b.out_channels * 9 + b.out_channels + 2 * b.out_channels
    }

    pub fn block_macs(&self, b: &BlockInfo, input: Chw) -> usize {
        let out = self.block_output(b, input);
        input.c * b.out_channels * 9 * out.h * out.w
    }

    pub fn classifier_params(&self, num_classes: usize) -> usize {
        let c = self.widths[self.widths.len() - 1];
        match self.form {
            VggForm::Cifar => c * num_classes + num_classes,
            VggForm::ImageNet => {
                let h = self.hidden;
                c * 49 * h + h + h * h + h + h * num_classes + num_classes
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_torchvision_feature_indices() {
        let v = VggSpec::from_name("vgg11").unwrap();
        assert_eq!((v.depths.clone(), v.form), (vec![1, 1, 2, 2, 2], VggForm::ImageNet));
        // torchvision vgg11_bn.features: conv at 0, 4, 8, 11, 15, 18, 22, 25.
        let idx: Vec<usize> = v.blocks().iter().map(|b| v.feature_index(b.at)).collect();
        assert_eq!(idx, [0, 4, 8, 11, 15, 18, 22, 25]);
        let c = VggSpec::from_name("vgg13-cifar-w8").unwrap();
        assert_eq!((c.widths.clone(), c.form), (vec![8, 16, 32, 64, 64], VggForm::Cifar));
        assert_eq!(VggSpec::from_name("vgg16-cifar").unwrap().depths, [2, 2, 3, 3, 3]);
        for bad in ["vgg19", "vgg13-w", "vgg13-cifar-w0", "vgg13-tiny", "vgg"] {
            assert_eq!(VggSpec::from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn small_images_are_refused() {
        let c = VggSpec::from_name("vgg11-cifar").unwrap();
        assert!(c.check_input(Chw { c: 1, h: 28, w: 28 }).is_ok());
        assert!(c.check_input(Chw { c: 3, h: 16, w: 16 }).is_ok());
        let e = c.check_input(Chw { c: 3, h: 8, w: 8 }).unwrap_err();
        assert!(e.contains("8x8") && e.contains("16x16"), "{e}");
        let i = VggSpec::from_name("vgg11").unwrap();
        assert!(i.check_input(Chw { c: 3, h: 16, w: 16 }).is_err());
    }
}

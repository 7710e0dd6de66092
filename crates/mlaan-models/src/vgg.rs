//! VGG pieces with batch norm on torchvision's `vgg*_bn` names: a conv layer is
//! `features.{j}` (3x3 conv with bias) and `features.{j+1}` (its batch norm), the ImageNet
//! classifier `classifier.{0,3,6}`. The CIFAR form's single linear layer is `classifier`.
//! Initialisation is torchvision's: convolutions He-normal (fan-out) with zero biases, batch
//! norms 1 and 0, linears N(0, 0.01) with zero biases.
//!
//! torchvision's classifier has dropout (p = 0.5) after both hidden layers; here it has none,
//! because a run draws no random numbers while it trains (what makes resumed runs and
//! pipelined schedules exact). Dropout does nothing at evaluation, so exported weights give
//! torchvision's predictions.

use crate::layers::HE_FAN_OUT;
use crate::layers::{global_max_pool, max_pool2, relu, BatchNorm2d, Conv2d, Linear, Mode};
use mlaan_core::arch::{BlockInfo, VggForm, VggSpec};
use tch::nn::{self, Init};
use tch::Tensor;

/// One conv layer: the max-pool in front when it opens a stage, then conv, batch norm, ReLU.
#[derive(Debug)]
pub struct Layer {
    pool: bool,
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Layer {
    /// The layer `info` with its conv under `conv` and its batch norm under `bn`.
    pub fn new(conv: nn::Path, bn: nn::Path, info: &BlockInfo) -> Self {
        let shape = [info.in_channels, info.out_channels, 3, 1, 1];
        Layer {
            pool: info.stride == 2,
            conv: Conv2d::with_init(conv, shape, HE_FAN_OUT, Some(Init::Const(0.0))),
            bn: BatchNorm2d::new(bn, info.out_channels),
        }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        let x = if self.pool { max_pool2(x) } else { x.shallow_clone() };
        relu(self.bn.forward(&self.conv.forward(&x), mode))
    }
}

/// What follows the last conv layer.
#[derive(Debug)]
pub enum Classifier {
    /// The last pool over the whole map (at 32x32 it is the 2x2 max-pool), one linear layer.
    Cifar(Linear),
    /// The last 2x2 max-pool, an average pool to 7x7, Linear–ReLU–Linear–ReLU–Linear.
    ImageNet([Linear; 3]),
}

impl Classifier {
    pub fn new(root: &nn::Path, v: &VggSpec, classes: usize) -> Self {
        let c = v.widths[v.widths.len() - 1];
        let p = root / "classifier";
        match v.form {
            VggForm::Cifar => Classifier::Cifar(Linear::normal(p, c, classes, 0.01)),
            VggForm::ImageNet => Classifier::ImageNet([
                Linear::normal(&p / "0", c * 49, v.hidden, 0.01),
                Linear::normal(&p / "3", v.hidden, v.hidden, 0.01),
                Linear::normal(&p / "6", v.hidden, classes, 0.01),
            ]),
        }
    }

    pub fn forward(&self, h: &Tensor) -> Tensor {
        match self {
            Classifier::Cifar(fc) => fc.forward(&global_max_pool(h)),
            Classifier::ImageNet([fc0, fc3, fc6]) => {
                let x = max_pool2(h).adaptive_avg_pool2d([7, 7]).flatten(1, -1);
                fc6.forward(&relu(fc3.forward(&relu(fc0.forward(&x)))))
            }
        }
    }
}

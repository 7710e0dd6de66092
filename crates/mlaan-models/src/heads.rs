//! Auxiliary networks: classifier heads and InfoPro's decoders — for feature maps (ResNets,
//! VGGs) and for token sequences (ViTs).

use crate::layers::{global_avg_pool, relu, saved, BatchNorm2d, Conv2d, LayerNorm, Linear, Mode};
use crate::vit::LN_EPS;
use mlaan_core::config::HeadKind;
use tch::nn;
use tch::Tensor;

/// Hidden width of the MLP layers of `1c2f` (InfoPro's feature_dim).
const FEATURE_DIM: usize = 128;
/// Hidden width of the DGL head's MLP.
const DGL_HIDDEN: usize = 256;

/// A classifier head mapping a feature map (N, C, H, W) to (N, out).
#[derive(Debug)]
pub enum Head {
    /// Global average pool + linear (MLAAN's code, and the final classifier).
    GapFc(Linear),
    /// InfoPro's `1c2f`: 3x3 conv (stride 2 and doubled width below 64 channels) + BN + ReLU +
    /// GAP + FC(128) + ReLU + FC(out).
    OneConvTwoFc { conv: Conv2d, bn: BatchNorm2d, fc1: Linear, fc2: Linear },
    /// The DGL paper's deeper head: two 3x3 conv + BN + ReLU layers, 2x2 average pool, and a
    /// three-layer MLP.
    Dgl { convs: Vec<(Conv2d, BatchNorm2d)>, fcs: Vec<Linear> },
    /// For token sequences (N, T, D): LayerNorm, then the class token (`mean: false`, the form
    /// of a ViT's own classifier) or the mean of the patch tokens (timm's `avg` pooling, which
    /// leaves the class token out), then linear.
    Tokens { norm: LayerNorm, fc: Linear, mean: bool },
}

impl Head {
    pub fn new(p: &nn::Path, kind: HeadKind, in_channels: usize, out: usize) -> Self {
        match kind {
            HeadKind::GapFc => Head::GapFc(Linear::new(p / "fc", in_channels, out)),
            HeadKind::OneConvTwoFc => {
                let (width, stride) =
                    if in_channels < 64 { (2 * in_channels, 2) } else { (in_channels, 1) };
                Head::OneConvTwoFc {
                    conv: Conv2d::new(p / "conv", in_channels, width, 3, stride, false),
                    bn: BatchNorm2d::new(p / "bn", width),
                    fc1: Linear::new(p / "fc1", width, FEATURE_DIM),
                    fc2: Linear::new(p / "fc2", FEATURE_DIM, out),
                }
            }
            HeadKind::Dgl => Head::Dgl {
                convs: (0..2)
                    .map(|j| {
                        (
                            Conv2d::new(
                                p / format!("conv{j}"),
                                in_channels,
                                in_channels,
                                3,
                                1,
                                false,
                            ),
                            BatchNorm2d::new(p / format!("bn{j}"), in_channels),
                        )
                    })
                    .collect(),
                fcs: vec![
                    Linear::new(p / "fc0", 4 * in_channels, DGL_HIDDEN),
                    Linear::new(p / "fc1", DGL_HIDDEN, DGL_HIDDEN),
                    Linear::new(p / "fc2", DGL_HIDDEN, out),
                ],
            },
            HeadKind::ClsFc | HeadKind::MeanFc => Head::Tokens {
                norm: LayerNorm::new(p / "norm", in_channels, LN_EPS),
                fc: Linear::normal(p / "fc", in_channels, out, 0.02),
                mean: kind == HeadKind::MeanFc,
            },
        }
    }

    pub fn forward(&self, h: &Tensor, mode: Mode) -> Tensor {
        match self {
            Head::GapFc(fc) => fc.forward(&global_avg_pool(h)),
            Head::OneConvTwoFc { conv, bn, fc1, fc2 } => {
                let x = relu(bn.forward(&conv.forward(h), mode));
                fc2.forward(&relu(fc1.forward(&global_avg_pool(&x))))
            }
            Head::Dgl { convs, fcs } => {
                let mut x = h.shallow_clone();
                for (conv, bn) in convs {
                    x = relu(bn.forward(&conv.forward(&x), mode));
                }
                saved(&x);
                let mut x = x.adaptive_avg_pool2d([2, 2]).flatten(1, -1);
                for (j, fc) in fcs.iter().enumerate() {
                    x = fc.forward(&x);
                    if j + 1 < fcs.len() {
                        x = relu(x);
                    }
                }
                x
            }
            Head::Tokens { norm, fc, mean } => {
                let pooled = if *mean {
                    let patches = h.narrow(1, 1, h.size()[1] - 1);
                    patches.mean_dim(&[1i64][..], false, h.kind())
                } else {
                    h.select(1, 0)
                };
                fc.forward(&norm.forward(&pooled))
            }
        }
    }
}

/// InfoPro's decoder, reconstructing the image in (0, 1) from a module's output.
#[derive(Debug)]
pub enum Decoder {
    /// From a feature map: bilinear upsampling to the image size, 3x3 conv to 12 channels,
    /// BN, ReLU, 3x3 conv to the image's channels, sigmoid (InfoPro's).
    Conv(ConvDecoder),
    /// From a ViT's tokens: LayerNorm, then one linear map per patch token to its p×p×C
    /// pixels (the class token dropped), sigmoid, the patches put back in place.
    Patches(PatchDecoder),
}

impl Decoder {
    /// The convolutional decoder for `in_channels`-wide feature maps.
    pub fn new(p: &nn::Path, in_channels: usize, image_channels: usize, size: [usize; 2]) -> Self {
        Decoder::Conv(ConvDecoder::new(p, in_channels, image_channels, size))
    }

    /// The per-patch decoder for tokens of `width` made from `patch`×`patch` patches.
    pub fn patches(
        p: &nn::Path,
        width: usize,
        image_channels: usize,
        size: [usize; 2],
        patch: usize,
    ) -> Self {
        Decoder::Patches(PatchDecoder {
            norm: LayerNorm::new(p / "norm", width, LN_EPS),
            proj: Linear::normal(p / "proj", width, patch * patch * image_channels, 0.02),
            grid: [(size[0] / patch) as i64, (size[1] / patch) as i64],
            patch: patch as i64,
            channels: image_channels as i64,
        })
    }

    pub fn forward(&self, h: &Tensor, mode: Mode) -> Tensor {
        match self {
            Decoder::Conv(d) => d.forward(h, mode),
            Decoder::Patches(d) => d.forward(h),
        }
    }
}

/// See [`Decoder::Patches`].
#[derive(Debug)]
pub struct PatchDecoder {
    norm: LayerNorm,
    proj: Linear,
    grid: [i64; 2],
    patch: i64,
    channels: i64,
}

impl PatchDecoder {
    fn forward(&self, h: &Tensor) -> Tensor {
        let n = h.size()[0];
        let ([gh, gw], p, c) = (self.grid, self.patch, self.channels);
        // Each patch token's values in the patch convolution's (C, p, p) order.
        let pixels = self.proj.forward(&self.norm.forward(&h.narrow(1, 1, gh * gw)));
        let image = pixels.view([n, gh, gw, c, p, p]).permute([0, 3, 1, 4, 2, 5]);
        let y = image.reshape([n, c, gh * p, gw * p]).sigmoid();
        saved(&y);
        y
    }
}

/// See [`Decoder::Conv`].
#[derive(Debug)]
pub struct ConvDecoder {
    conv1: Conv2d,
    bn: BatchNorm2d,
    conv2: Conv2d,
    size: [i64; 2],
}

impl ConvDecoder {
    fn new(p: &nn::Path, in_channels: usize, image_channels: usize, size: [usize; 2]) -> Self {
        ConvDecoder {
            conv1: Conv2d::new(p / "conv1", in_channels, 12, 3, 1, true),
            bn: BatchNorm2d::new(p / "bn", 12),
            conv2: Conv2d::new(p / "conv2", 12, image_channels, 3, 1, true),
            size: [size[0] as i64, size[1] as i64],
        }
    }

    fn forward(&self, h: &Tensor, mode: Mode) -> Tensor {
        let up = h.upsample_bilinear2d(self.size, true, None, None);
        let x = relu(self.bn.forward(&self.conv1.forward(&up), mode));
        let y = self.conv2.forward(&x).sigmoid();
        saved(&y);
        y
    }
}

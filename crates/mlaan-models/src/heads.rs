//! Auxiliary networks: classifier heads, AugLocal's networks and InfoPro's decoders — for
//! feature maps (ResNets, VGGs) and for token sequences (ViTs).

use crate::backbone::{copy_paths, Unit};
use crate::layers::{global_avg_pool, relu, saved, BatchNorm2d, Conv2d, LayerNorm, Linear, Mode};
use crate::vit::LN_EPS;
use mlaan_core::arch::{ArchSpec, Backbone};
use mlaan_core::auglocal::AuxNetSpec;
use mlaan_core::config::HeadKind;
use tch::nn;
use tch::Tensor;

/// Hidden width of the MLP layers of `1c2f` (InfoPro's feature_dim).
const FEATURE_DIM: usize = 128;
/// Hidden width of the DGL head's MLP.
const DGL_HIDDEN: usize = 256;
/// Width of the official AugLocal VGG network's MLP (and of the pooled vector it reads).
const AUGLOCAL_VGG_HIDDEN: usize = 512;

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
    /// AugLocal's network: fresh units shaped like later layers (`block0`, ...), then its end.
    AugLocal { units: Vec<Unit>, end: AugLocalEnd },
}

/// How an AugLocal network ends, by backbone.
#[derive(Debug)]
pub enum AugLocalEnd {
    /// ResNets (the official code's): global average pool, a batch norm over the pooled
    /// features at depth 1 on CIFAR, linear.
    Pool { bn: Option<BatchNorm2d>, fc: Linear },
    /// ViTs (no official form): the backbone's own classifier form, a [`Head::Tokens`] on
    /// the class token.
    Tokens(Box<Head>),
    /// VGGs (the official ImageNet code's): the flattened map average-pooled to 512 numbers,
    /// then (Linear → BatchNorm → ReLU) twice and a linear classifier.
    Mlp { fcs: [Linear; 3], bns: [BatchNorm2d; 2] },
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

    /// AugLocal's network `spec` on `arch`, classifying into `out`.
    pub fn aux_net(p: &nn::Path, arch: &ArchSpec, spec: &AuxNetSpec, out: usize) -> Self {
        let units = spec
            .blocks
            .iter()
            .enumerate()
            .map(|(j, b)| {
                let names = arch.block_prefixes(b.at).len();
                Unit::new(arch, &copy_paths(&(p / format!("block{j}")), names), b)
            })
            .collect();
        let c = spec.features;
        let end = match &arch.backbone {
            Backbone::ResNet(_) => AugLocalEnd::Pool {
                bn: spec.batch_norm.then(|| BatchNorm2d::new(p / "bn", c)),
                fc: Linear::new(p / "fc", c, out),
            },
            Backbone::Vit(_) => {
                AugLocalEnd::Tokens(Box::new(Head::new(p, HeadKind::ClsFc, c, out)))
            }
            Backbone::Vgg(_) => {
                let h = AUGLOCAL_VGG_HIDDEN;
                AugLocalEnd::Mlp {
                    fcs: [
                        Linear::new(p / "fc0", h, h),
                        Linear::new(p / "fc1", h, h),
                        Linear::new(p / "fc2", h, out),
                    ],
                    bns: [BatchNorm2d::new(p / "bn0", h), BatchNorm2d::new(p / "bn1", h)],
                }
            }
        };
        Head::AugLocal { units, end }
    }

    pub fn forward(&self, h: &Tensor, mode: Mode) -> Tensor {
        match self {
            Head::GapFc(fc) => fc.forward(&global_avg_pool(h)),
            Head::AugLocal { units, end } => {
                let mut x = h.shallow_clone();
                for u in units {
                    x = u.forward(&x, mode);
                }
                match end {
                    AugLocalEnd::Pool { bn, fc } => {
                        let pooled = global_avg_pool(&x);
                        fc.forward(&match bn {
                            Some(bn) => bn.forward(&pooled, mode),
                            None => pooled,
                        })
                    }
                    AugLocalEnd::Tokens(head) => head.forward(&x, mode),
                    AugLocalEnd::Mlp { fcs: [fc0, fc1, fc2], bns: [bn0, bn1] } => {
                        // Flatten, then average-pool the C·H·W numbers down to 512.
                        let flat = x.flatten(1, -1).unsqueeze(1);
                        let pooled =
                            flat.adaptive_avg_pool1d([AUGLOCAL_VGG_HIDDEN as i64]).squeeze_dim(1);
                        let y = relu(bn0.forward(&fc0.forward(&pooled), mode));
                        let y = relu(bn1.forward(&fc1.forward(&y), mode));
                        fc2.forward(&y)
                    }
                }
            }
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
#[cfg(test)]
mod tests {
    use super::*;
    use mlaan_core::arch::{ArchSpec, BlockRef};
    use mlaan_core::auglocal::aux_net;
    use mlaan_core::split::{Split, SplitSpec};
    use tch::{Device, Kind};

    /// The official ResNet-32 run's first auxiliary network (module 0, the stem, depth 2):
    /// `Block(16->32,s2,proj) > Block(32->64,s2,proj) > GAP > Linear(64, 10)`, parameter by
    /// parameter as PyTorch would name and shape them.
    #[test]
    fn auglocal_network_has_the_official_shapes() {
        let arch = ArchSpec::from_name("resnet32").unwrap();
        let split = Split::resolve(&arch, 14, &SplitSpec::Named("per-layer".into())).unwrap();
        let spec = aux_net(&arch, &split, 0, 2);
        assert_eq!(spec.layers, [BlockRef::new(2, 2), BlockRef::new(3, 4)]);
        let vs = nn::VarStore::new(Device::Cpu);
        let head = Head::aux_net(&vs.root(), &arch, &spec, 10);
        let mut shapes: Vec<(String, Vec<i64>)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        shapes.retain(|(n, _)| !n.contains("running_"));
        shapes.sort();
        let expect: Vec<(String, Vec<i64>)> = [
            ("block0.bn1.bias", vec![32]),
            ("block0.bn1.weight", vec![32]),
            ("block0.bn2.bias", vec![32]),
            ("block0.bn2.weight", vec![32]),
            ("block0.conv1.weight", vec![32, 16, 3, 3]),
            ("block0.conv2.weight", vec![32, 32, 3, 3]),
            ("block0.downsample.0.weight", vec![32, 16, 1, 1]),
            ("block0.downsample.1.bias", vec![32]),
            ("block0.downsample.1.weight", vec![32]),
            ("block1.bn1.bias", vec![64]),
            ("block1.bn1.weight", vec![64]),
            ("block1.bn2.bias", vec![64]),
            ("block1.bn2.weight", vec![64]),
            ("block1.conv1.weight", vec![64, 32, 3, 3]),
            ("block1.conv2.weight", vec![64, 64, 3, 3]),
            ("block1.downsample.0.weight", vec![64, 32, 1, 1]),
            ("block1.downsample.1.bias", vec![64]),
            ("block1.downsample.1.weight", vec![64]),
            ("fc.bias", vec![10]),
            ("fc.weight", vec![10, 64]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        assert_eq!(shapes, expect);
        let logits =
            head.forward(&Tensor::ones([2, 16, 32, 32], (Kind::Float, Device::Cpu)), Mode::Train);
        assert_eq!(logits.size(), [2, 10]);
        // Depth 1 adds a batch norm over the 64 pooled features.
        let one = Head::aux_net(
            &nn::VarStore::new(Device::Cpu).root(),
            &arch,
            &aux_net(&arch, &split, 0, 1),
            10,
        );
        assert!(matches!(one, Head::AugLocal { end: AugLocalEnd::Pool { bn: Some(_), .. }, .. }));
    }

    /// The official ImageNet VGG-13 network of conv layer 4 at depth 4 (the max-pool in front
    /// of each width change is not a parameter): conv 256→256, conv 256→512, two 512→512,
    /// each with bias and batch norm; the MLP 512-512-1000 with two batch norms.
    #[test]
    fn auglocal_vgg_network_has_the_official_shapes() {
        let arch = ArchSpec::from_name("vgg13").unwrap();
        let split = Split::resolve(&arch, 10, &SplitSpec::Named("per-layer".into())).unwrap();
        let spec = aux_net(&arch, &split, 4, 4);
        let vs = nn::VarStore::new(Device::Cpu);
        let head = Head::aux_net(&vs.root(), &arch, &spec, 1000);
        let mut shapes: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .filter(|(n, _)| !n.contains("running_") && !n.contains("num_batches"))
            .map(|(n, t)| (n, t.size()))
            .collect();
        shapes.sort();
        let mut expect = vec![];
        for (j, (cin, cout)) in
            [(256, 256), (256, 512), (512, 512), (512, 512)].into_iter().enumerate()
        {
            expect.push((format!("block{j}.0.bias"), vec![cout]));
            expect.push((format!("block{j}.0.weight"), vec![cout, cin, 3, 3]));
            expect.push((format!("block{j}.1.bias"), vec![cout]));
            expect.push((format!("block{j}.1.weight"), vec![cout]));
        }
        for (n, s) in [
            ("bn0.bias", vec![512]),
            ("bn0.weight", vec![512]),
            ("bn1.bias", vec![512]),
            ("bn1.weight", vec![512]),
            ("fc0.bias", vec![512]),
            ("fc0.weight", vec![512, 512]),
            ("fc1.bias", vec![512]),
            ("fc1.weight", vec![512, 512]),
            ("fc2.bias", vec![1000]),
            ("fc2.weight", vec![1000, 512]),
        ] {
            expect.push((n.to_string(), s));
        }
        expect.sort();
        assert_eq!(shapes, expect);
        // Module 4's output is 256 wide at 56x56; two max-pools leave 14x14.
        let x = Tensor::ones([2, 256, 56, 56], (Kind::Float, Device::Cpu));
        assert_eq!(head.forward(&x, Mode::Train).size(), [2, 1000]);
    }

    /// A ViT's network: fresh blocks of the backbone's form, then LayerNorm → class token →
    /// linear, the backbone's own classifier form.
    #[test]
    fn auglocal_vit_network_ends_like_the_vit() {
        let arch = ArchSpec::from_name("vit-w32-d4-h2-p4").unwrap();
        let split = Split::resolve(&arch, 3, &SplitSpec::Named("even".into())).unwrap();
        let spec = aux_net(&arch, &split, 0, 2);
        assert_eq!(spec.blocks.len(), 2);
        let vs = nn::VarStore::new(Device::Cpu);
        let head = Head::aux_net(&vs.root(), &arch, &spec, 10);
        let names: std::collections::BTreeSet<String> =
            vs.variables().into_keys().map(|n| n.split('.').next().unwrap().to_string()).collect();
        assert_eq!(names, ["block0", "block1", "fc", "norm"].map(String::from).into());
        let tokens = Tensor::ones([2, 5, 32], (Kind::Float, Device::Cpu));
        assert_eq!(head.forward(&tokens, Mode::Train).size(), [2, 10]);
    }
}

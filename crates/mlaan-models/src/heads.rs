//! Auxiliary networks: classifier heads, AugLocal's networks and InfoPro's decoder.

use crate::layers::{global_avg_pool, relu, saved, BatchNorm2d, Conv2d, Linear, Mode};
use crate::resnet::Block;
use mlaan_core::arch::BlockKind;
use mlaan_core::auglocal::AuxNetSpec;
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
    /// AugLocal's network: fresh residual blocks shaped like later layers (`block0`, ...),
    /// global average pool, a batch norm at depth 1 (CIFAR), linear.
    AugLocal { blocks: Vec<Block>, bn: Option<BatchNorm2d>, fc: Linear },
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
        }
    }

    /// AugLocal's network `spec` of `kind` blocks, classifying into `out`.
    pub fn aux_net(p: &nn::Path, kind: BlockKind, spec: &AuxNetSpec, out: usize) -> Self {
        Head::AugLocal {
            blocks: spec
                .blocks
                .iter()
                .enumerate()
                .map(|(j, b)| Block::new(&(p / format!("block{j}")), kind, b))
                .collect(),
            bn: spec.batch_norm.then(|| BatchNorm2d::new(p / "bn", spec.features)),
            fc: Linear::new(p / "fc", spec.features, out),
        }
    }

    pub fn forward(&self, h: &Tensor, mode: Mode) -> Tensor {
        match self {
            Head::GapFc(fc) => fc.forward(&global_avg_pool(h)),
            Head::AugLocal { blocks, bn, fc } => {
                let mut x = h.shallow_clone();
                for b in blocks {
                    x = b.forward(&x, mode);
                }
                let pooled = global_avg_pool(&x);
                fc.forward(&match bn {
                    Some(bn) => bn.forward(&pooled, mode),
                    None => pooled,
                })
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
        }
    }
}

/// InfoPro's decoder: bilinear upsampling to the image size, 3x3 conv to 12 channels, BN,
/// ReLU, 3x3 conv to the image's channels, sigmoid.
#[derive(Debug)]
pub struct Decoder {
    conv1: Conv2d,
    bn: BatchNorm2d,
    conv2: Conv2d,
    size: [i64; 2],
}

impl Decoder {
    pub fn new(p: &nn::Path, in_channels: usize, image_channels: usize, size: [usize; 2]) -> Self {
        Decoder {
            conv1: Conv2d::new(p / "conv1", in_channels, 12, 3, 1, true),
            bn: BatchNorm2d::new(p / "bn", 12),
            conv2: Conv2d::new(p / "conv2", 12, image_channels, 3, 1, true),
            size: [size[0] as i64, size[1] as i64],
        }
    }

    pub fn forward(&self, h: &Tensor, mode: Mode) -> Tensor {
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
        let head = Head::aux_net(&vs.root(), arch.block, &spec, 10);
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
            arch.block,
            &aux_net(&arch, &split, 0, 1),
            10,
        );
        assert!(matches!(one, Head::AugLocal { bn: Some(_), .. }));
    }
}

//! Vision Transformer pieces (Dosovitskiy et al., ICLR 2021) on timm's `VisionTransformer`
//! names and layout, so that a trained backbone loads into timm with `strict=True`:
//! `patch_embed.proj`, `cls_token` (1, 1, D), `pos_embed` (1, T, D, the class token's position
//! first), `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`.
//! The fused qkv projection's rows are q, then k, then v, each split into heads in order, as
//! timm reshapes it. Initialisation is timm's default: linears N(0, 0.02) with zero biases,
//! `pos_embed` N(0, 0.02), `cls_token` N(0, 1e-6), the patch projection PyTorch's default.

use crate::layers::{attention, gelu, Conv2d, LayerNorm, Linear};
use mlaan_core::arch::VitSpec;
use tch::nn::{self, Init};
use tch::Tensor;

/// timm's ViTs normalise with eps 1e-6.
pub const LN_EPS: f64 = 1e-6;
/// Standard deviation of timm's linear and position-embedding initialisation.
const STD: f64 = 0.02;

/// Patches to tokens: a p×p convolution of stride p, the class token in front, the position
/// embedding added. This is a ViT's stem.
#[derive(Debug)]
pub struct Embedding {
    proj: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
}

impl Embedding {
    /// For images of `in_channels` channels tiling into `tokens − 1` patches.
    pub fn new(root: &nn::Path, v: &VitSpec, in_channels: usize, tokens: usize) -> Self {
        let (d, p) = (v.width as i64, v.patch);
        // PyTorch's default for a convolution: uniform ±1/√fan_in for weight and bias.
        let bound = 1.0 / ((in_channels * p * p) as f64).sqrt();
        let uniform = Init::Uniform { lo: -bound, up: bound };
        Embedding {
            proj: Conv2d::with_init(
                root / "patch_embed" / "proj",
                [in_channels, v.width, p, p, 0],
                uniform,
                Some(uniform),
            ),
            cls_token: root.var("cls_token", &[1, 1, d], Init::Randn { mean: 0.0, stdev: 1e-6 }),
            pos_embed: root.var(
                "pos_embed",
                &[1, tokens as i64, d],
                Init::Randn { mean: 0.0, stdev: STD },
            ),
        }
    }

    /// (N, C, H, W) images → (N, T, D) tokens.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let patches = self.proj.forward(x).flatten(2, -1).transpose(1, 2);
        let n = patches.size()[0];
        let cls = self.cls_token.expand([n, -1, -1], false);
        Tensor::cat(&[cls, patches], 1) + &self.pos_embed
    }
}

/// A pre-norm transformer block: `x + proj(attn(qkv(norm1(x))))`, then
/// `x + fc2(gelu(fc1(norm2(x))))`.
#[derive(Debug)]
pub struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
}

impl Block {
    /// The block under `p` (`blocks.7`, or a LAM copy's own prefix).
    pub fn new(p: &nn::Path, v: &VitSpec) -> Self {
        let (d, h) = (v.width, v.mlp_hidden);
        Block {
            norm1: LayerNorm::new(p / "norm1", d, LN_EPS),
            qkv: Linear::normal(p / "attn" / "qkv", d, 3 * d, STD),
            proj: Linear::normal(p / "attn" / "proj", d, d, STD),
            norm2: LayerNorm::new(p / "norm2", d, LN_EPS),
            fc1: Linear::normal(p / "mlp" / "fc1", d, h, STD),
            fc2: Linear::normal(p / "mlp" / "fc2", h, d, STD),
            heads: v.heads as i64,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (n, t, d) = (s[0], s[1], s[2]);
        let qkv = self.qkv.forward(&self.norm1.forward(x));
        // (N, T, 3·D) → (3, N, heads, T, D/heads): q, k, v, each split into heads.
        let qkv = qkv.view([n, t, 3, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]);
        let o = attention(&qkv.get(0), &qkv.get(1), &qkv.get(2));
        let x = x + self.proj.forward(&o.transpose(1, 2).reshape([n, t, d]));
        let y = self.fc2.forward(&gelu(&self.fc1.forward(&self.norm2.forward(&x))));
        x + y
    }
}

/// The final LayerNorm (`norm`), the class token and the linear `head`. timm normalises every
/// token and then takes the class token; LayerNorm acts on each token alone, so normalising
/// the class token only gives the same logits.
#[derive(Debug)]
pub struct Classifier {
    norm: LayerNorm,
    head: Linear,
}

impl Classifier {
    pub fn new(root: &nn::Path, v: &VitSpec, classes: usize) -> Self {
        Classifier {
            norm: LayerNorm::new(root / "norm", v.width, LN_EPS),
            head: Linear::normal(root / "head", v.width, classes, STD),
        }
    }

    pub fn forward(&self, h: &Tensor) -> Tensor {
        self.head.forward(&self.norm.forward(&h.select(1, 0)))
    }
}

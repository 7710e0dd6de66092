//! Vision Transformers as data (Dosovitskiy et al., ICLR 2021), in timm's `VisionTransformer`
//! form: a patch embedding by a strided convolution, a class token and a learned position
//! embedding (the embedding, module 0's "stem"), then `depth` pre-norm blocks
//! (LayerNorm → multi-head self-attention with a fused qkv projection → residual; LayerNorm →
//! MLP with GELU → residual), then a final LayerNorm, the class token and a linear head.
//!
//! Activations are token sequences (N, T, D); a [`Chw`] holds one sample's as `c = D` (the
//! width), `h = T` (tokens, the class token included), `w = 1`.

use super::{BlockInfo, BlockRef, Chw};
use serde::Serialize;

/// One ViT: width D, depth (blocks), attention heads, patch side and the MLP's hidden width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VitSpec {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch: usize,
    pub mlp_hidden: usize,
}

/// timm's presets (`vit_{tiny,small,base}_patch16_224`): (width, depth, heads).
const PRESETS: [(&str, usize, usize, usize); 3] =
    [("tiny", 192, 12, 3), ("small", 384, 12, 6), ("base", 768, 12, 12)];

impl VitSpec {
    /// `vit-tiny|small|base` (patch 16, timm's presets), the same with `-p{P}` for another
    /// patch side (`vit-tiny-p4` for 32x32 or 28x28 images), or any shape written out as
    /// `vit-w{width}-d{depth}-h{heads}-p{patch}`. The MLP is 4 × the width wide, as in all of
    /// timm's presets. `None` when the name is not a ViT's or the numbers do not fit.
    pub fn from_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("vit-")?;
        let spec = |width: usize, depth: usize, heads: usize, patch: usize| {
            let ok =
                width > 0 && depth > 0 && heads > 0 && patch > 0 && width.is_multiple_of(heads);
            ok.then_some(VitSpec { width, depth, heads, patch, mlp_hidden: 4 * width })
        };
        for (preset, width, depth, heads) in PRESETS {
            if let Some(tail) = rest.strip_prefix(preset) {
                let patch = match tail {
                    "" => 16,
                    t => t.strip_prefix("-p")?.parse().ok()?,
                };
                return spec(width, depth, heads, patch);
            }
        }
        // vit-w{W}-d{D}-h{H}-p{P}
        let mut numbers = rest
            .split('-')
            .zip(["w", "d", "h", "p"])
            .map(|(part, key)| part.strip_prefix(key).and_then(|n| n.parse::<usize>().ok()));
        let mut next = || numbers.next().flatten();
        let (w, d, h, p) = (next()?, next()?, next()?, next()?);
        (rest.split('-').count() == 4).then_some(())?;
        spec(w, d, h, p)
    }

    pub fn describe(&self) -> String {
        format!(
            "ViT, width {}, {} pre-norm blocks, {} heads, patch {}, MLP {} (class token, \
             learned position embedding)",
            self.width, self.depth, self.heads, self.patch, self.mlp_hidden
        )
    }

    /// The image must tile into whole patches (timm's fixed image size does the same).
    pub fn check_input(&self, input: Chw) -> Result<(), String> {
        if !input.h.is_multiple_of(self.patch)
            || !input.w.is_multiple_of(self.patch)
            || input.h < self.patch
        {
            return Err(format!(
                "{}x{} images do not tile into {p}x{p} patches (use an image side that is a \
                 multiple of {p}, or another patch with -p)",
                input.h,
                input.w,
                p = self.patch
            ));
        }
        Ok(())
    }

    /// Tokens of one image: one per patch, plus the class token.
    pub fn tokens(&self, input: Chw) -> usize {
        (input.h / self.patch) * (input.w / self.patch) + 1
    }

    /// Every block, in one stage: `[1, 0]` … `[1, depth − 1]`, all of the same width, so any
    /// later block can follow any earlier one in a LAM chain.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        (0..self.depth)
            .map(|i| BlockInfo {
                at: BlockRef::new(1, i),
                in_channels: self.width,
                planes: self.mlp_hidden,
                out_channels: self.width,
                stride: 1,
                projection: false,
            })
            .collect()
    }

    pub fn stem_output(&self, input: Chw) -> Chw {
        Chw { c: self.width, h: self.tokens(input), w: 1 }
    }

    /// Patch projection (conv weight and bias), class token, position embedding.
    pub fn stem_params(&self, input: Chw) -> usize {
        let d = self.width;
        input.c * self.patch * self.patch * d + d + d + self.tokens(input) * d
    }

    /// norm1, qkv, proj, norm2, fc1, fc2 (every linear with a bias, LayerNorms affine).
    pub fn block_params(&self) -> usize {
        let (d, h) = (self.width, self.mlp_hidden);
        2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    }

    /// Final LayerNorm and the linear head.
    pub fn classifier_params(&self, num_classes: usize) -> usize {
        2 * self.width + self.width * num_classes + num_classes
    }

    /// One block for one sample of T tokens: the qkv, output and MLP projections
    /// (T·(4D² + 2D·hidden)) and attention's two products, QKᵀ and its product with V
    /// (2·T²·D over all heads).
    pub fn block_macs(&self, tokens: Chw) -> usize {
        let (t, d, h) = (tokens.h, self.width, self.mlp_hidden);
        t * (4 * d * d + 2 * d * h) + 2 * t * t * d
    }

    /// The patch projection: each of the (H/p)(W/p) patches to D values from C·p² inputs.
    pub fn stem_macs(&self, input: Chw) -> usize {
        (self.tokens(input) - 1) * self.width * input.c * self.patch * self.patch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_timm_presets_and_written_out_shapes() {
        let t = VitSpec::from_name("vit-tiny").unwrap();
        assert_eq!((t.width, t.depth, t.heads, t.patch, t.mlp_hidden), (192, 12, 3, 16, 768));
        let s = VitSpec::from_name("vit-small-p4").unwrap();
        assert_eq!((s.width, s.heads, s.patch), (384, 6, 4));
        assert_eq!(VitSpec::from_name("vit-base").unwrap().heads, 12);
        let c = VitSpec::from_name("vit-w64-d6-h2-p4").unwrap();
        assert_eq!((c.width, c.depth, c.heads, c.patch, c.mlp_hidden), (64, 6, 2, 4, 256));
        for bad in ["vit-huge", "vit-tiny-4", "vit-tiny-p0", "vit-w65-d6-h2-p4", "vit-w64-d6-h2"] {
            assert_eq!(VitSpec::from_name(bad), None, "{bad}");
        }
        assert_eq!(VitSpec::from_name("vit-w64-d6-h2-p4-x"), None);
    }

    #[test]
    fn timm_parameter_counts() {
        // timm: vit_tiny_patch16_224 5,717,416; vit_small_patch16_224 22,050,664;
        // vit_base_patch16_224 86,567,656 (1000 classes).
        let input = Chw { c: 3, h: 224, w: 224 };
        for (name, n) in
            [("vit-tiny", 5_717_416), ("vit-small", 22_050_664), ("vit-base", 86_567_656)]
        {
            let v = VitSpec::from_name(name).unwrap();
            let total =
                v.stem_params(input) + v.depth * v.block_params() + v.classifier_params(1000);
            assert_eq!(total, n, "{name}");
        }
    }

    #[test]
    fn patches_must_tile_the_image() {
        let v = VitSpec::from_name("vit-tiny-p4").unwrap();
        assert_eq!(v.tokens(Chw { c: 1, h: 28, w: 28 }), 50);
        assert_eq!(v.tokens(Chw { c: 3, h: 32, w: 32 }), 65);
        let e = v.check_input(Chw { c: 3, h: 30, w: 30 }).unwrap_err();
        assert!(e.contains("30x30") && e.contains("4x4"), "{e}");
    }
}

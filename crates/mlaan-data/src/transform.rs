//! Seeded augmentation: a [`Transform`] is a list of [`Op`]s applied in order to a CHW `u8`
//! image. Every random choice comes from the caller's RNG, which the loader seeds from
//! `(seed, epoch, sample index)`, so results do not depend on threads or batch composition.
//!
//! All geometric ops reduce to two primitives: `crop_window` (a window that may reach outside the
//! image, filled by zero or reflection — this is both the padded random crop and the centre
//! crop) and a [`Resample`] (antialiased bilinear resampling of a source rectangle, like
//! torchvision's; see [`crate::resample`]).
//!
//! A transform that is one resample of the source — ImageNet's `RandomResizedCrop` + flip and
//! `Resize` + `CenterCrop` — can be asked for it before any pixel exists
//! ([`Transform::resample_for`]), which is how the JPEG decoder decodes only the pixels the
//! transform reads.

use crate::resample::{store_planes, Area, Rect, Resample};
use crate::{DataError, ImageShape, Sample};
use mlaan_core::config::PadMode;
use rand::Rng;

/// One augmentation step.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Pad every side by `pad` (zero or reflect) and take a random `size`x`size` crop
    /// (`None`: the input's own height and width) — CIFAR's `RandomCrop(32, padding=4)`.
    PadCrop { pad: usize, mode: PadMode, size: Option<usize> },
    /// Random area fraction in `scale` and aspect ratio in `ratio` (log-uniform), resized to
    /// `size`x`size` — torchvision's `RandomResizedCrop` including its 10 tries and fallback.
    RandomResizedCrop { size: usize, scale: (f64, f64), ratio: (f64, f64) },
    /// Resize so that the shorter side is `size`, keeping the aspect ratio.
    ResizeShorter { size: usize },
    /// Centre `size`x`size` window; zero-filled where the image is smaller.
    CenterCrop { size: usize },
    /// Mirror left-right with probability 1/2.
    HFlip,
}

/// An augmentation pipeline; the empty pipeline passes images through.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transform {
    ops: Vec<Op>,
}

impl Transform {
    pub fn new(ops: Vec<Op>) -> Self {
        Transform { ops }
    }
    pub fn identity() -> Self {
        Transform::default()
    }
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
    pub fn is_identity(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the ops to one sample. Fails (instead of panicking) when a crop does not fit
    /// or the sample's buffer does not match its shape.
    pub fn apply(
        &self,
        s: &Sample,
        rng: &mut impl Rng,
    ) -> Result<(Vec<u8>, ImageShape), DataError> {
        let mut out = Vec::new();
        let shape = self.apply_into(s, rng, &mut out)?;
        Ok((out, shape))
    }

    /// Like [`Transform::apply`], appending the result to `out` (a batch being filled). On an
    /// error `out` is left as it was.
    pub fn apply_into(
        &self,
        s: &Sample,
        rng: &mut impl Rng,
        out: &mut Vec<u8>,
    ) -> Result<ImageShape, DataError> {
        if s.image.len() != s.shape.len() {
            return Err(DataError::Transform(format!(
                "image buffer of {} bytes does not match its shape {}",
                s.image.len(),
                s.shape
            )));
        }
        if !self.ops.is_empty() && s.shape.is_empty() {
            return Err(DataError::Transform(format!("cannot augment an empty {} image", s.shape)));
        }
        if let Some(r) = self.resample_for(s.shape.height, s.shape.width, rng) {
            let base = out.len();
            return match resample_planes(&s.image, s.shape, &r, out) {
                Ok(()) => Ok(ImageShape::new(s.shape.channels, r.out.1, r.out.0)),
                Err(e) => {
                    out.truncate(base);
                    Err(e)
                }
            };
        }
        let mut img = Img { data: s.image.clone(), shape: s.shape };
        for op in &self.ops {
            img = apply_op(op, img, rng)?;
        }
        out.extend_from_slice(&img.data);
        Ok(img.shape)
    }

    /// The whole transform as one [`Resample`] of an `h`x`w` image, when it is one:
    /// `RandomResizedCrop`, `ResizeShorter`, `ResizeShorter` + a `CenterCrop` that fits, or a
    /// `CenterCrop` that fits, each optionally followed by `HFlip`. Draws from `rng` exactly
    /// what [`Transform::apply`] draws (nothing when it returns `None`), so a decoder that
    /// plans its work with it produces the same augmentation as decoding everything first.
    pub fn resample_for(&self, h: usize, w: usize, rng: &mut impl Rng) -> Option<Resample> {
        if h == 0 || w == 0 {
            return None;
        }
        let (geometry, flip) = match self.ops.as_slice() {
            [rest @ .., Op::HFlip] => (rest, true),
            all => (all, false),
        };
        let image = (w, h);
        let whole = Rect { x: 0, y: 0, w, h };
        let mut r = match *geometry {
            [Op::RandomResizedCrop { size, scale, ratio }] => {
                let (top, left, ch, cw) = random_resized_box(h, w, scale, ratio, rng);
                Resample::crop(image, Rect { x: left, y: top, w: cw, h: ch }, (size, size))
            }
            [Op::ResizeShorter { size }] => {
                let (oh, ow) = shorter_side_dims(h, w, size);
                Resample::crop(image, whole, (ow, oh))
            }
            [Op::ResizeShorter { size }, Op::CenterCrop { size: crop }] => {
                let (oh, ow) = shorter_side_dims(h, w, size);
                if crop > oh || crop > ow {
                    return None;
                }
                // The crop of the resized image, mapped back onto the source: the same output
                // pixels as resizing everything and cropping, computed alone.
                let (top, left) = (centre_offset(oh, crop), centre_offset(ow, crop));
                let (sy, sx) = (h as f64 / oh as f64, w as f64 / ow as f64);
                let area = Area {
                    x: left as f64 * sx,
                    y: top as f64 * sy,
                    w: crop as f64 * sx,
                    h: crop as f64 * sy,
                };
                Resample { image, window: whole, area, out: (crop, crop), flip: false }
            }
            [Op::CenterCrop { size }] if size <= h && size <= w => {
                let r =
                    Rect { x: centre_offset(w, size), y: centre_offset(h, size), w: size, h: size };
                Resample::crop(image, r, (size, size))
            }
            _ => return None,
        };
        // As `apply_op`'s HFlip: the draw happens whatever the width.
        r.flip = flip && rng.random_bool(0.5) && r.out.0 > 1;
        Some(r)
    }

    /// The shape `apply` produces for an input of shape `input`.
    pub fn output_shape(&self, input: ImageShape) -> ImageShape {
        self.ops.iter().fold(input, |s, op| match *op {
            Op::PadCrop { size, .. } => match size {
                Some(n) => ImageShape::new(s.channels, n, n),
                None => s,
            },
            Op::RandomResizedCrop { size, .. } | Op::CenterCrop { size } => {
                ImageShape::new(s.channels, size, size)
            }
            Op::ResizeShorter { size } => {
                let (h, w) = shorter_side_dims(s.height, s.width, size);
                ImageShape::new(s.channels, h, w)
            }
            Op::HFlip => s,
        })
    }
}

impl std::fmt::Display for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ops.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .ops
            .iter()
            .map(|op| match op {
                Op::PadCrop { pad, mode, size } => format!(
                    "random crop{} pad {pad} ({})",
                    size.map(|s| format!(" {s}")).unwrap_or_default(),
                    match mode {
                        PadMode::Zero => "zero",
                        PadMode::Reflect => "reflect",
                    }
                ),
                Op::RandomResizedCrop { size, scale, ratio } => format!(
                    "random resized crop {size} (scale {}-{}, ratio {:.3}-{:.3})",
                    scale.0, scale.1, ratio.0, ratio.1
                ),
                Op::ResizeShorter { size } => format!("resize shorter side {size}"),
                Op::CenterCrop { size } => format!("centre crop {size}"),
                Op::HFlip => "h-flip".into(),
            })
            .collect();
        f.write_str(&parts.join(" + "))
    }
}

/// A CHW image in flight through the ops.
struct Img {
    data: Vec<u8>,
    shape: ImageShape,
}

fn apply_op(op: &Op, img: Img, rng: &mut impl Rng) -> Result<Img, DataError> {
    let s = img.shape;
    Ok(match *op {
        Op::PadCrop { pad, mode, size } => {
            let (oh, ow) = size.map_or((s.height, s.width), |n| (n, n));
            let (ph, pw) = (s.height + 2 * pad, s.width + 2 * pad);
            if oh > ph || ow > pw || oh == 0 || ow == 0 {
                return Err(DataError::Transform(format!(
                    "cannot take a {oh}x{ow} crop from a {}x{} image padded by {pad}",
                    s.height, s.width
                )));
            }
            let top = rng.random_range(0..=ph - oh) as isize - pad as isize;
            let left = rng.random_range(0..=pw - ow) as isize - pad as isize;
            crop_window(&img, top, left, oh, ow, mode)
        }
        Op::CenterCrop { size } => {
            // torchvision: offset = round((in - out) / 2), negative when padding is needed.
            let off = |n: usize| ((n as f64 - size as f64) / 2.0).round() as isize;
            crop_window(&img, off(s.height), off(s.width), size, size, PadMode::Zero)
        }
        Op::RandomResizedCrop { size, scale, ratio } => {
            let (top, left, h, w) = random_resized_box(s.height, s.width, scale, ratio, rng);
            let r = Rect { x: left, y: top, w, h };
            resample(&img, &Resample::crop((s.width, s.height), r, (size, size)))?
        }
        Op::ResizeShorter { size } => {
            let (oh, ow) = shorter_side_dims(s.height, s.width, size);
            let whole = Rect { x: 0, y: 0, w: s.width, h: s.height };
            resample(&img, &Resample::crop((s.width, s.height), whole, (ow, oh)))?
        }
        Op::HFlip => {
            let mut img = img;
            if rng.random_bool(0.5) && s.width > 1 {
                img.data.chunks_exact_mut(s.width).for_each(<[u8]>::reverse);
            }
            img
        }
    })
}

/// torchvision's centre-crop offset `round((n - size) / 2)` for a crop that fits.
fn centre_offset(n: usize, size: usize) -> usize {
    ((n - size) as f64 / 2.0).round() as usize
}

/// torchvision's `Resize(int)`: the shorter side becomes `size`, the longer is scaled and
/// truncated.
fn shorter_side_dims(h: usize, w: usize, size: usize) -> (usize, usize) {
    if h == 0 || w == 0 {
        return (size, size);
    }
    if h <= w {
        (size, ((size * w) / h).max(1))
    } else {
        (((size * h) / w).max(1), size)
    }
}

/// Where a source row/column index outside `0..n` reads from.
fn border_index(i: isize, n: usize, mode: PadMode) -> Option<usize> {
    if (0..n as isize).contains(&i) {
        return Some(i as usize);
    }
    match mode {
        PadMode::Zero => None,
        // Mirror without repeating the edge (numpy/torch "reflect"), folded periodically so
        // that any padding width is defined.
        PadMode::Reflect => {
            if n == 1 {
                return Some(0);
            }
            let period = 2 * (n as isize - 1);
            let m = i.rem_euclid(period);
            Some(if m < n as isize { m } else { period - m } as usize)
        }
    }
}

/// An `oh`x`ow` window whose top-left corner is at (`top`, `left`) in image coordinates
/// (possibly negative or past the edge); outside pixels follow `mode`.
fn crop_window(img: &Img, top: isize, left: isize, oh: usize, ow: usize, mode: PadMode) -> Img {
    let s = img.shape;
    let cols: Vec<Option<usize>> =
        (0..ow).map(|x| border_index(left + x as isize, s.width, mode)).collect();
    let inside = left >= 0 && left as usize + ow <= s.width;
    let mut out = Vec::with_capacity(s.channels * oh * ow);
    for plane in img.data.chunks_exact(s.height * s.width) {
        for y in 0..oh {
            match border_index(top + y as isize, s.height, mode) {
                None => out.resize(out.len() + ow, 0),
                Some(sy) => {
                    let row = &plane[sy * s.width..(sy + 1) * s.width];
                    if inside {
                        out.extend_from_slice(&row[left as usize..left as usize + ow]);
                    } else {
                        out.extend(cols.iter().map(|c| c.map_or(0, |x| row[x])));
                    }
                }
            }
        }
    }
    Img { data: out, shape: ImageShape::new(s.channels, oh, ow) }
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random area and
/// log-uniform aspect ratio; otherwise the whole image clamped to the ratio range, centred.
fn random_resized_box(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * rng.random::<f64>());
        let aspect = (lr0 + (lr1 - lr0) * rng.random::<f64>()).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.random_range(0..=h - ch);
            let left = rng.random_range(0..=w - cw);
            return (top, left, ch, cw);
        }
    }
    let in_ratio = w as f64 / h.max(1) as f64;
    let (ch, cw) = if in_ratio < ratio.0 {
        (((w as f64 / ratio.0).round() as usize).clamp(1, h.max(1)), w)
    } else if in_ratio > ratio.1 {
        (h, ((h as f64 * ratio.1).round() as usize).clamp(1, w.max(1)))
    } else {
        (h, w)
    };
    ((h - ch.min(h)) / 2, (w - cw.min(w)) / 2, ch.min(h), cw.min(w))
}

/// Runs `r` on a CHW image and returns the CHW result.
fn resample(img: &Img, r: &Resample) -> Result<Img, DataError> {
    let mut data = Vec::new();
    resample_planes(&img.data, img.shape, r, &mut data)?;
    Ok(Img { data, shape: ImageShape::new(img.shape.channels, r.out.1, r.out.0) })
}

/// Runs `r` on a CHW image, appending the CHW result to `out`. Up to four channels are
/// interleaved and resampled together (as the JPEG path does, so both give the same bytes);
/// more are resampled one plane at a time.
fn resample_planes(
    image: &[u8],
    s: ImageShape,
    r: &Resample,
    out: &mut Vec<u8>,
) -> Result<(), DataError> {
    let at = Rect { x: 0, y: 0, w: s.width, h: s.height };
    let plane = s.height * s.width;
    let per_run = if s.channels <= 4 { s.channels } else { 1 };
    let mut hwc = vec![0u8; r.out.0 * r.out.1 * per_run];
    let mut src = Vec::with_capacity(plane * per_run);
    for planes in image.chunks(plane * per_run) {
        src.clear();
        match per_run {
            1 => src.extend_from_slice(planes),
            c => src.extend((0..plane).flat_map(|i| (0..c).map(move |ch| planes[ch * plane + i]))),
        }
        r.run(&src, at, per_run, &mut hwc).map_err(DataError::Transform)?;
        store_planes(&hwc, r.out, per_run, r.flip, out);
    }
    Ok(())
}

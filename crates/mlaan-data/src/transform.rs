//! Seeded augmentation: a [`Transform`] is a list of [`Op`]s applied in order to a CHW `u8`
//! image. Every random choice comes from the caller's RNG, which the loader seeds from
//! `(seed, epoch, sample index)`, so results do not depend on threads or batch composition.
//!
//! All geometric ops reduce to two primitives: `crop_window` (a window that may reach outside the
//! image, filled by zero or reflection — this is both the padded random crop and the centre
//! crop) and `resize` (separable triangle-filter resampling of a window, which is bilinear
//! when enlarging and antialiased when shrinking, like PIL's and torchvision's bilinear).

use crate::{DataError, ImageShape, Sample};
use mlaan_core::config::PadMode;
use rand::Rng;
use std::ops::Range;

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
        let mut img = Img { data: s.image.clone(), shape: s.shape };
        let mut i = 0;
        while i < self.ops.len() {
            img = match (&self.ops[i], self.ops.get(i + 1)) {
                // Resize-then-centre-crop (evaluation) computes only the kept pixels.
                (&Op::ResizeShorter { size }, Some(&Op::CenterCrop { size: crop })) => {
                    i += 1;
                    resize_shorter_then_crop(&img, size, crop)
                }
                (op, _) => apply_op(op, img, rng)?,
            };
            i += 1;
        }
        Ok((img.data, img.shape))
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
            resize(&img, (top, left, h, w), size, size)
        }
        Op::ResizeShorter { size } => {
            let (oh, ow) = shorter_side_dims(s.height, s.width, size);
            resize(&img, (0, 0, s.height, s.width), oh, ow)
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

/// `ResizeShorter { size }` followed by `CenterCrop { crop }`, resizing only the output
/// pixels the crop keeps (falls back to the two steps when the crop must pad).
fn resize_shorter_then_crop(img: &Img, size: usize, crop: usize) -> Img {
    let s = img.shape;
    let (oh, ow) = shorter_side_dims(s.height, s.width, size);
    if crop > oh || crop > ow {
        let resized = resize(img, (0, 0, s.height, s.width), oh, ow);
        let off = |n: usize| ((n as f64 - crop as f64) / 2.0).round() as isize;
        return crop_window(&resized, off(oh), off(ow), crop, crop, PadMode::Zero);
    }
    let (top, left) =
        (((oh - crop) as f64 / 2.0).round() as usize, ((ow - crop) as f64 / 2.0).round() as usize);
    resize_part(img, (0, 0, s.height, s.width), oh, ow, top..top + crop, left..left + crop)
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

/// Source taps of a run of output pixels along one axis: output `first + i` reads
/// `weights[i*taps..][..taps]` times the source pixels from `start[i]` on.
struct Taps {
    start: Vec<usize>,
    weights: Vec<f32>,
    taps: usize,
}

/// Triangle-filter taps mapping the window `[offset, offset+len)` of an axis onto an output
/// axis of `out` pixels, for the outputs in `range`. The filter is widened by the shrink
/// factor so that downscaling averages (antialiasing) — PIL's bilinear filter.
fn taps(offset: usize, len: usize, out: usize, range: Range<usize>) -> Taps {
    let scale = len as f64 / out as f64;
    let support = scale.max(1.0);
    let taps = (2.0 * support).ceil() as usize + 1;
    let mut start = Vec::with_capacity(range.len());
    let mut weights = vec![0f32; range.len() * taps];
    for (n, i) in range.enumerate() {
        let center = (i as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5).floor().max(0.0) as usize).min(len - 1);
        let hi = ((center + support + 0.5).floor() as usize).clamp(lo + 1, len).min(lo + taps);
        let ws = &mut weights[n * taps..(n + 1) * taps];
        let mut sum = 0.0;
        for (k, j) in (lo..hi).enumerate() {
            let wgt = (1.0 - ((j as f64 + 0.5 - center) / support).abs()).max(0.0);
            ws[k] = wgt as f32;
            sum += wgt;
        }
        if sum > 0.0 {
            ws.iter_mut().for_each(|v| *v = (*v as f64 / sum) as f32);
        } else {
            ws[0] = 1.0;
        }
        start.push(offset + lo);
    }
    Taps { start, weights, taps }
}

/// Resamples the window (`top`, `left`, `h`, `w`) of `img` to `oh`x`ow`.
fn resize(img: &Img, window: (usize, usize, usize, usize), oh: usize, ow: usize) -> Img {
    resize_part(img, window, oh, ow, 0..oh, 0..ow)
}

/// Like [`resize`] but computes only output rows `rows` and columns `cols` of the `oh`x`ow`
/// result (a resize fused with the crop that follows it). The vertical pass runs first, over
/// contiguous source rows (vectorisable), into one `f32` row; the horizontal pass then reads
/// that row, so its cost scales with the output, not the source.
fn resize_part(
    img: &Img,
    (top, left, h, w): (usize, usize, usize, usize),
    oh: usize,
    ow: usize,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Img {
    let s = img.shape;
    let out_shape = ImageShape::new(s.channels, rows.len(), cols.len());
    if rows.is_empty() || cols.is_empty() {
        return Img { data: Vec::new(), shape: out_shape };
    }
    let (h, w) = (h.clamp(1, s.height), w.clamp(1, s.width));
    let tx = taps(left, w, ow, cols);
    let ty = taps(top, h, oh, rows);
    // The source columns any output column reads.
    let c0 = tx.start[0];
    let c1 = (tx.start[tx.start.len() - 1] + tx.taps).min(left + w);
    // Zero tail: the last taps of the last columns may point past `c1` (with zero weight).
    let mut acc = vec![0f32; c1 - c0 + tx.taps];
    let mut hrow = vec![0f32; tx.start.len()];
    // Horizontal weights tap-major, so the inner loop runs over output columns.
    let n = tx.start.len();
    let wt: Vec<f32> = (0..tx.taps * n).map(|j| tx.weights[(j % n) * tx.taps + j / n]).collect();
    let mut out = Vec::with_capacity(out_shape.len());
    for plane in img.data.chunks_exact(s.height * s.width) {
        for (y, &sy) in ty.start.iter().enumerate() {
            acc.fill(0.0);
            let ws = &ty.weights[y * ty.taps..(y + 1) * ty.taps];
            for (k, &wk) in ws.iter().enumerate() {
                if wk == 0.0 || sy + k >= top + h {
                    continue;
                }
                let row = &plane[(sy + k) * s.width + c0..(sy + k) * s.width + c1];
                acc.iter_mut().zip(row).for_each(|(a, &p)| *a += wk * f32::from(p));
            }
            hrow.fill(0.0);
            for (k, wk) in wt.chunks_exact(n).enumerate() {
                for ((o, &w), &sx) in hrow.iter_mut().zip(wk).zip(&tx.start) {
                    *o += w * acc[sx - c0 + k];
                }
            }
            out.extend(hrow.iter().map(|&v| (v + 0.5).clamp(0.0, 255.0) as u8));
        }
    }
    Img { data: out, shape: out_shape }
}

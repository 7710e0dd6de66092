//! The crate's one resampler: what a resizing transform does to an image, written as a
//! [`Resample`] (which source rectangle becomes the output), and the code that runs it with
//! fast_image_resize's convolution resizer (AVX2 / SSE4.1 / NEON).
//!
//! The filter is Pillow's bilinear with its support widened by the reduction factor, which is
//! what torchvision's `Resize`/`RandomResizedCrop` compute (`antialias=True`). A [`Resample`]
//! says which pixels the filter may read (`window`): torchvision's `RandomResizedCrop` crops
//! first, so its taps stop at the crop's edges; `Resize` + `CenterCrop` resizes the whole image,
//! so taps near the crop's edges read pixels outside it. [`Resample::reads`] is exactly the
//! set of pixels a run reads, which is what lets the JPEG decoder decode only those.

use fast_image_resize as fr;
use std::cell::RefCell;

/// A rectangle of whole pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

impl Rect {
    pub fn contains(&self, o: &Rect) -> bool {
        o.x >= self.x
            && o.y >= self.y
            && o.x + o.w <= self.x + self.w
            && o.y + o.h <= self.y + self.h
    }
}

/// A rectangle with fractional edges, in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Area {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// One resizing step on an image of `image` = (width, height) pixels: the source `area` is
/// resampled to `out` = (width, height), reading no pixel outside `window`; `flip` mirrors the
/// result left-right.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resample {
    pub image: (usize, usize),
    pub window: Rect,
    pub area: Area,
    pub out: (usize, usize),
    pub flip: bool,
}

/// Reductions a JPEG decoder can apply in the DCT domain (libjpeg-turbo's SIMD scales).
const DCT_REDUCTIONS: [usize; 3] = [8, 4, 2];

impl Resample {
    /// Resamples the whole rectangle `r` to `out` (a crop, then a resize: taps stay inside).
    pub fn crop(image: (usize, usize), r: Rect, out: (usize, usize)) -> Self {
        let area = Area { x: r.x as f64, y: r.y as f64, w: r.w as f64, h: r.h as f64 };
        Resample { image, window: r, area, out, flip: false }
    }

    /// The largest reduction `d` in 8, 4, 2 for which the area stays at least as large as the
    /// output in both directions once the image is decoded at `1/d` scale; 1 if none.
    pub fn dct_reduction(&self) -> usize {
        DCT_REDUCTIONS
            .into_iter()
            .find(|&d| {
                self.area.w >= (d * self.out.0) as f64 && self.area.h >= (d * self.out.1) as f64
            })
            .unwrap_or(1)
    }

    /// The same resampling on the image reduced by `d` as a JPEG decoder reduces it: the
    /// scaled image is `ceil(size / d)` and pixel `i` covers source pixels `d·i .. d·(i+1)`.
    pub fn reduced(&self, d: usize) -> Resample {
        if d == 1 {
            return *self;
        }
        let image = (self.image.0.div_ceil(d), self.image.1.div_ceil(d));
        let (x0, y0) = (self.window.x / d, self.window.y / d);
        let x1 = (self.window.x + self.window.w).div_ceil(d).min(image.0);
        let y1 = (self.window.y + self.window.h).div_ceil(d).min(image.1);
        let window =
            Rect { x: x0, y: y0, w: x1.saturating_sub(x0).max(1), h: y1.saturating_sub(y0).max(1) };
        let df = d as f64;
        let a = self.area;
        let area = Area { x: a.x / df, y: a.y / df, w: a.w / df, h: a.h / df };
        Resample { image, window, area: clamp_area(area, window), out: self.out, flip: self.flip }
    }

    /// Every pixel the filter reads: the area widened by the filter's support (1 output pixel
    /// = `area / out` source pixels, at least 1) plus one pixel for rounding, within the
    /// window.
    pub fn reads(&self) -> Rect {
        let axis = |start: f64, len: f64, out: usize, lo: usize, hi: usize| {
            let support = (len / out.max(1) as f64).max(1.0);
            let a = ((start - support).floor() - 1.0).max(lo as f64) as usize;
            let b = ((start + len + support).ceil() + 1.0).min(hi as f64) as usize;
            (a.min(hi.saturating_sub(1)), b.max(a + 1).min(hi))
        };
        let w = &self.window;
        let (x0, x1) = axis(self.area.x, self.area.w, self.out.0, w.x, w.x + w.w);
        let (y0, y1) = axis(self.area.y, self.area.h, self.out.1, w.y, w.y + w.h);
        Rect { x: x0, y: y0, w: x1 - x0, h: y1 - y0 }
    }

    /// Resamples interleaved pixels of `channels` bytes into `dst` (`out.0 * out.1` pixels,
    /// interleaved). `src` holds the rectangle `at` of the image, row-major without padding,
    /// and must cover [`Resample::reads`]. The result depends only on the pixels in `reads`,
    /// so a decoder that produced just those gives the same bytes as a full decode.
    pub fn run(&self, src: &[u8], at: Rect, channels: usize, dst: &mut [u8]) -> Result<(), String> {
        let need = self.reads();
        if !at.contains(&need) {
            return Err(format!("resampling reads {need:?} but the source holds {at:?}"));
        }
        let pixel = match channels {
            1 => fr::PixelType::U8,
            2 => fr::PixelType::U8x2,
            3 => fr::PixelType::U8x3,
            4 => fr::PixelType::U8x4,
            c => return Err(format!("cannot resample {c} interleaved channels")),
        };
        let u32_of = |v: usize| u32::try_from(v).map_err(|_| format!("{v} pixels is too many"));
        let image = fr::images::ImageRef::new(u32_of(at.w)?, u32_of(at.h)?, src, pixel)
            .map_err(|e| format!("source image: {e}"))?;
        let view = fr::images::CroppedImage::new(
            &image,
            u32_of(need.x - at.x)?,
            u32_of(need.y - at.y)?,
            u32_of(need.w)?,
            u32_of(need.h)?,
        )
        .map_err(|e| format!("source view: {e}"))?;
        let a = clamp_area(self.area, need);
        let mut out =
            fr::images::Image::from_slice_u8(u32_of(self.out.0)?, u32_of(self.out.1)?, dst, pixel)
                .map_err(|e| format!("output image: {e}"))?;
        let options = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
            .use_alpha(false)
            .crop(a.x - need.x as f64, a.y - need.y as f64, a.w, a.h);
        RESIZER
            .with(|r| r.borrow_mut().resize(&view, &mut out, &options))
            .map_err(|e| e.to_string())
    }
}

thread_local! {
    /// fast_image_resize keeps its scratch buffers in the resizer: one per thread.
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

/// `a` moved and shrunk to lie within `r` (rounding can put an edge a hair outside).
fn clamp_area(a: Area, r: Rect) -> Area {
    let (x0, y0) = (a.x.max(r.x as f64), a.y.max(r.y as f64));
    let x1 = (a.x + a.w).min((r.x + r.w) as f64);
    let y1 = (a.y + a.h).min((r.y + r.h) as f64);
    Area { x: x0, y: y0, w: (x1 - x0).max(f64::MIN_POSITIVE), h: (y1 - y0).max(f64::MIN_POSITIVE) }
}

/// Appends the interleaved `width`x`height` image `hwc` to `out` as `channels` planes (CHW),
/// mirrored left-right when `flip`.
pub fn store_planes(
    hwc: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    flip: bool,
    out: &mut Vec<u8>,
) {
    let plane = width * height;
    let base = out.len();
    out.resize(base + channels * plane, 0);
    let dst = &mut out[base..];
    match channels {
        1 => {
            for (src, dst) in hwc.chunks_exact(width).zip(dst.chunks_exact_mut(width)) {
                if flip {
                    dst.iter_mut().zip(src.iter().rev()).for_each(|(d, s)| *d = *s);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
        3 => {
            // Iterators throughout: no index, no bounds check in the inner loop.
            let (r, rest) = dst.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            let planes = r
                .chunks_exact_mut(width)
                .zip(g.chunks_exact_mut(width))
                .zip(b.chunks_exact_mut(width));
            for (src, ((r, g), b)) in hwc.chunks_exact(3 * width).zip(planes) {
                let dst = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
                let mut put = |(p, ((r, g), b)): (&[u8], ((&mut u8, &mut u8), &mut u8))| {
                    (*r, *g, *b) = (p[0], p[1], p[2]);
                };
                if flip {
                    src.chunks_exact(3).rev().zip(dst).for_each(&mut put);
                } else {
                    src.chunks_exact(3).zip(dst).for_each(&mut put);
                }
            }
        }
        c => {
            let col = |x: usize| if flip { width - 1 - x } else { x };
            for (i, px) in hwc.chunks_exact(c).enumerate() {
                let (y, x) = (i / width, col(i % width));
                for (ch, &v) in px.iter().enumerate() {
                    dst[ch * plane + y * width + x] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interleaved pixel (x, y, channel) = 100·channel + 10·y + x, as planes by hand.
    #[test]
    fn planes_are_stored_and_mirrored() {
        let (w, h) = (3, 2);
        for c in [1, 3, 5] {
            let hwc: Vec<u8> = (0..h)
                .flat_map(|y| {
                    (0..w).flat_map(move |x| (0..c).map(move |ch| (100 * ch + 10 * y + x) as u8))
                })
                .collect();
            for flip in [false, true] {
                let mut out = vec![9];
                store_planes(&hwc, (w, h), c, flip, &mut out);
                let want: Vec<u8> = std::iter::once(9)
                    .chain((0..c).flat_map(|ch| {
                        (0..h).flat_map(move |y| {
                            (0..w).map(move |x| {
                                let sx = if flip { w - 1 - x } else { x };
                                (100 * ch + 10 * y + sx) as u8
                            })
                        })
                    }))
                    .collect();
                assert_eq!(out, want, "{c} channels, flip {flip}");
            }
        }
    }

    #[test]
    fn dct_reduction_keeps_the_area_at_least_the_output() {
        let r = |w: usize, h: usize| {
            Resample::crop((4000, 3000), Rect { x: 0, y: 0, w, h }, (224, 224)).dct_reduction()
        };
        assert_eq!(r(447, 3000), 1);
        assert_eq!(r(448, 448), 2);
        assert_eq!(r(900, 895), 2);
        assert_eq!(r(896, 896), 4);
        assert_eq!(r(1792, 1792), 8);
        assert_eq!(r(4000, 3000), 8);
    }
}

//! Compressed images: decoding for ImageFolder datasets (JPEG with the system libjpeg-turbo,
//! PNG with the `png` crate) and JPEG encoding for generated test and benchmark trees
//! (jpeg-encoder).
//!
//! [`decode_transformed`] is the hot path: for a JPEG it reads the header, asks the transform
//! which source rectangle it resamples ([`Transform::resample_for`]), and decodes only the
//! pixels that resampling reads — whole iMCU columns around them, the rows from the first
//! needed to the last (rows above are skipped, rows below never decoded) — at the smallest
//! DCT scale (1/2, 1/4, 1/8) that still leaves the rectangle at least as large as the output.
//! Every other case decodes the whole image and applies the transform to it.
//!
//! Every ImageFolder sample has 3 channels, as torchvision's loader (`Image.convert("RGB")`)
//! gives them: grey images are replicated, CMYK is converted with Pillow's formula, PNG alpha
//! is dropped. EXIF orientation is ignored, as torchvision ignores it.

pub mod turbo;

use crate::resample::{store_planes, Rect, Resample};
use crate::transform::Transform;
use crate::{DataError, ImageShape, Sample};
use rand::Rng;
use std::cell::RefCell;
use std::path::Path;
use turbo::{Color, Jpeg};

/// Columns decoded beyond the needed ones on each side of a partial-width JPEG decode: the
/// smooth chroma upsampling treats the edges of a partial row like image edges, so the first
/// and last column of a crop can differ from a full decode (libjpeg.txt, "Partial image
/// decompression"); these columns are decoded and not read.
const CROP_EDGE: usize = 2;

/// What the file holds, from its first bytes (not its name: ImageNet has PNGs named `.JPEG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Jpeg,
    Png,
}

fn sniff(bytes: &[u8], path: &Path) -> Result<Kind, DataError> {
    if bytes.starts_with(&[0xff, 0xd8]) {
        Ok(Kind::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(Kind::Png)
    } else if bytes.is_empty() {
        Err(DataError::format(path, "an empty file, not an image"))
    } else {
        Err(DataError::format(
            path,
            format!("not a JPEG or PNG image (starts with {:02x?})", &bytes[..bytes.len().min(4)]),
        ))
    }
}

/// Decodes a whole image file into a 3-channel CHW image. Errors name `path` and say what is
/// wrong; images above `max_pixels` are refused before their pixels are decoded.
pub fn decode(
    bytes: &[u8],
    path: &Path,
    max_pixels: u64,
) -> Result<(Vec<u8>, ImageShape), DataError> {
    match sniff(bytes, path)? {
        Kind::Png => decode_png(bytes, path, max_pixels),
        Kind::Jpeg => {
            check_complete(bytes, path)?;
            with_jpeg(bytes, path, |jpeg| {
                let h = jpeg.header();
                check_size(h.width, h.height, max_pixels, path)?;
                decode_whole_jpeg(jpeg, path)
            })
        }
    }
}

/// Decodes an image file and applies `transform`, appending the 3-channel CHW result to
/// `out` (a batch being filled); returns its shape. On an error `out` is left as it was.
pub fn decode_transformed(
    bytes: &[u8],
    path: &Path,
    max_pixels: u64,
    transform: &Transform,
    rng: &mut impl Rng,
    out: &mut Vec<u8>,
) -> Result<ImageShape, DataError> {
    let apply = |(image, shape): (Vec<u8>, ImageShape), rng: &mut _, out: &mut Vec<u8>| {
        transform.apply_into(&Sample { image, shape, label: 0 }, rng, out)
    };
    match sniff(bytes, path)? {
        Kind::Png => apply(decode_png(bytes, path, max_pixels)?, rng, out),
        Kind::Jpeg => {
            check_complete(bytes, path)?;
            with_jpeg(bytes, path, |jpeg| {
                let h = jpeg.header();
                check_size(h.width, h.height, max_pixels, path)?;
                match transform.resample_for(h.height, h.width, rng) {
                    Some(r) => decode_resampled(jpeg, &r, out)
                        .map_err(|e| DataError::format(path, format!("undecodable JPEG: {e}"))),
                    None => apply(decode_whole_jpeg(jpeg, path)?, rng, out),
                }
            })
        }
    }
}

/// Runs `f` on the opened JPEG with this thread's decompressor.
fn with_jpeg<R>(
    bytes: &[u8],
    path: &Path,
    f: impl FnOnce(&mut Jpeg<'_>) -> Result<R, DataError>,
) -> Result<R, DataError> {
    let undecodable = |e: String| DataError::format(path, format!("undecodable JPEG: {e}"));
    turbo::with_decompressor(|dec| {
        Ok(dec.open(bytes).map_err(undecodable).and_then(|mut j| f(&mut j)))
    })
    .map_err(undecodable)?
}

fn check_size(width: usize, height: usize, max_pixels: u64, path: &Path) -> Result<(), DataError> {
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(DataError::format(path, format!("image of {width}x{height} pixels")));
    }
    if pixels > max_pixels {
        return Err(DataError::format(
            path,
            format!(
                "{width}x{height} = {pixels} pixels exceeds data.max_image_pixels = {max_pixels} \
                 (a decompression bomb?)"
            ),
        ));
    }
    Ok(())
}

/// Refuses a JPEG whose data stops before its end-of-image marker, however little of it a
/// crop would decode (Pillow refuses truncated files too). Entropy-coded data cannot contain
/// the marker bytes `FF D9` or `FF DA` (a data `FF` is followed by `00`), so the file is
/// complete when an `FF D9` follows the last start-of-scan `FF DA`. Nearly every file simply
/// ends with `FF D9`, which is checked first.
fn check_complete(bytes: &[u8], path: &Path) -> Result<(), DataError> {
    let trimmed = bytes.iter().rposition(|&b| b != 0).map_or(&bytes[..0], |i| &bytes[..=i]);
    if trimmed.ends_with(&[0xff, 0xd9]) {
        return Ok(());
    }
    let last_scan = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
    let complete = last_scan.is_some_and(|s| bytes[s..].windows(2).any(|w| w == [0xff, 0xd9]));
    if complete {
        Ok(())
    } else {
        Err(DataError::format(
            path,
            format!(
                "undecodable JPEG: truncated (no end-of-image marker in its {} bytes)",
                bytes.len()
            ),
        ))
    }
}

thread_local! {
    /// The decoded region and the resampled output of the JPEG path, reused image after image.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The JPEG path of [`decode_transformed`]: decodes what `r` reads, at the smallest DCT
/// scale that keeps the source area at least the output's size, and resamples it.
fn decode_resampled(
    jpeg: &mut Jpeg<'_>,
    r: &Resample,
    out: &mut Vec<u8>,
) -> Result<ImageShape, String> {
    let color = jpeg.header().color;
    let d = r.dct_reduction();
    let r = r.reduced(d);
    let need = r.reads();
    let (scaled_w, _) = jpeg.scaled_size(d);
    let cols = (need.x.saturating_sub(CROP_EDGE), (need.x + need.w + CROP_EDGE).min(scaled_w));
    SCRATCH.with(|scratch| {
        let mut scratch =
            scratch.try_borrow_mut().map_err(|_| "scratch buffers in use".to_string())?;
        let (region, hwc) = &mut *scratch;
        let got = jpeg.decode(d, cols, (need.y, need.y + need.h), region)?;
        let channels = to_rgb_in_place(color, region);
        let at = Rect { x: got.x, y: got.y, w: got.width, h: got.height };
        hwc.resize(r.out.0 * r.out.1 * channels, 0);
        r.run(region, at, channels, hwc)?;
        let base = out.len();
        store_planes(hwc, r.out, channels, r.flip, out);
        if channels == 1 {
            let plane = r.out.0 * r.out.1;
            out.extend_from_within(base..base + plane);
            out.extend_from_within(base..base + plane);
        }
        Ok(ImageShape::new(3, r.out.1, r.out.0))
    })
}

/// Decodes every pixel of a JPEG into a 3-channel CHW image.
fn decode_whole_jpeg(jpeg: &mut Jpeg<'_>, path: &Path) -> Result<(Vec<u8>, ImageShape), DataError> {
    let h = jpeg.header();
    let mut hwc = Vec::new();
    jpeg.decode(1, (0, h.width), (0, h.height), &mut hwc)
        .map_err(|e| DataError::format(path, format!("undecodable JPEG: {e}")))?;
    let channels = to_rgb_in_place(h.color, &mut hwc);
    Ok(interleaved_to_rgb_planes(&hwc, h.width, h.height, channels))
}

/// Converts decoded CMYK pixels to RGB in place (the buffer shrinks to 3 bytes per pixel);
/// returns the channels per pixel afterwards (1 for grey, else 3).
fn to_rgb_in_place(color: Color, pixels: &mut Vec<u8>) -> usize {
    let Color::Cmyk { inverted } = color else {
        return color.decoded_channels();
    };
    let n = pixels.len() / 4;
    for i in 0..n {
        let p = [pixels[4 * i], pixels[4 * i + 1], pixels[4 * i + 2], pixels[4 * i + 3]];
        let ink = |v: u8| if inverted { 255 - v } else { v };
        let rgb = cmyk_to_rgb([ink(p[0]), ink(p[1]), ink(p[2]), ink(p[3])]);
        pixels[3 * i..3 * i + 3].copy_from_slice(&rgb);
    }
    pixels.truncate(3 * n);
    3
}

/// Pillow's CMYK to RGB (`Image.convert("RGB")`, `cmyk2rgb` in Convert.c): each colour is
/// `(255 - K) - round(C·(255 - K)/255)`, with Pillow's integer rounding.
pub fn cmyk_to_rgb([c, m, y, k]: [u8; 4]) -> [u8; 3] {
    let nk = 255 - u32::from(k);
    let muldiv255 = |a: u32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(u32::from(v))) as u8)
}

/// An interleaved image of 1, 3 or 4 channels as 3 CHW planes: grey replicated, a fourth
/// channel (PNG alpha) dropped.
fn interleaved_to_rgb_planes(
    hwc: &[u8],
    width: usize,
    height: usize,
    channels: usize,
) -> (Vec<u8>, ImageShape) {
    let shape = ImageShape::new(3, height, width);
    let plane = width * height;
    let mut chw = Vec::with_capacity(3 * plane);
    match channels {
        1 | 2 => {
            // Grey, or grey + alpha.
            chw.extend(hwc.iter().step_by(channels));
            chw.extend_from_within(..plane);
            chw.extend_from_within(..plane);
        }
        _ => {
            for c in 0..3 {
                chw.extend(hwc.iter().skip(c).step_by(channels));
            }
        }
    }
    (chw, shape)
}

/// Decodes a PNG (any bit depth and colour type) to 3-channel CHW as Pillow's
/// `convert("RGB")` does: palettes expanded, 16-bit samples cut to their high byte, alpha
/// dropped, grey replicated.
fn decode_png(
    bytes: &[u8],
    path: &Path,
    max_pixels: u64,
) -> Result<(Vec<u8>, ImageShape), DataError> {
    let bad = |e: png::DecodingError| DataError::format(path, format!("undecodable PNG: {e}"));
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(bad)?;
    let (w, h) = reader.info().size();
    check_size(w as usize, h as usize, max_pixels, path)?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).map_err(bad)?;
    let channels = frame.color_type.samples();
    if frame.bit_depth != png::BitDepth::Eight || !(1..=4).contains(&channels) {
        return Err(DataError::format(
            path,
            format!(
                "PNG decoded to {:?} {:?}, expected 8-bit samples",
                frame.color_type, frame.bit_depth
            ),
        ));
    }
    let (w, h) = (frame.width as usize, frame.height as usize);
    // Rows may be padded to `line_size`; keep `w * channels` bytes of each.
    let row = w * channels;
    let packed: Vec<u8> =
        buf.chunks(frame.line_size).take(h).flat_map(|l| &l[..row]).copied().collect();
    Ok(interleaved_to_rgb_planes(&packed, w, h, channels))
}

/// Encodes a CHW image with 1 or 3 channels as a baseline JPEG.
pub fn encode_jpeg(image: &[u8], shape: ImageShape, quality: u8) -> Result<Vec<u8>, String> {
    let (h, w) = (shape.height, shape.width);
    if h > usize::from(u16::MAX) || w > usize::from(u16::MAX) || image.len() != shape.len() {
        return Err(format!("cannot encode a {shape} image from {} bytes", image.len()));
    }
    let plane = h * w;
    let (hwc, color) = match shape.channels {
        1 => (image.to_vec(), jpeg_encoder::ColorType::Luma),
        3 => {
            let mut hwc = Vec::with_capacity(image.len());
            for i in 0..plane {
                hwc.extend_from_slice(&[image[i], image[plane + i], image[2 * plane + i]]);
            }
            (hwc, jpeg_encoder::ColorType::Rgb)
        }
        c => return Err(format!("cannot encode {c} channels as JPEG")),
    };
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, quality)
        .encode(&hwc, w as u16, h as u16, color)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

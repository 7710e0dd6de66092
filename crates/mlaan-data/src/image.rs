//! Compressed-image codecs: JPEG decoding for ImageFolder datasets (zune-jpeg) and JPEG
//! encoding for generated test/benchmark trees (jpeg-encoder).

use crate::{DataError, ImageShape};
use std::path::Path;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

/// Decodes a JPEG file's bytes into a 3-channel CHW image (greyscale is replicated, so every
/// ImageFolder sample has the same channel count). Errors name `path` and say what is wrong.
pub fn decode(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, ImageShape), DataError> {
    if !bytes.starts_with(&[0xff, 0xd8]) {
        let what = if bytes.starts_with(b"\x89PNG") {
            "a PNG image; only JPEG is supported".to_string()
        } else if bytes.is_empty() {
            "an empty file, not a JPEG image".to_string()
        } else {
            format!("not a JPEG image (starts with {:02x?})", &bytes[..bytes.len().min(4)])
        };
        return Err(DataError::format(path, what));
    }
    let options =
        DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB).set_strict_mode(false);
    // zune-jpeg returns errors for the corruptions we have met, but it is third-party code
    // fed with arbitrary files: a panic inside it must become this file's error, not kill a
    // loader thread.
    let decoded = std::panic::catch_unwind(|| {
        let mut d = zune_jpeg::JpegDecoder::new_with_options(bytes, options);
        let pixels = d.decode()?;
        let (w, h) = d.dimensions().unwrap_or((0, 0));
        Ok::<_, zune_jpeg::errors::DecodeErrors>((pixels, h, w))
    });
    let (pixels, h, w) = match decoded {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(DataError::format(path, format!("undecodable JPEG: {e:?}"))),
        Err(_) => return Err(DataError::format(path, "undecodable JPEG (decoder panicked)")),
    };
    let plane = h * w;
    if plane == 0 || pixels.len() % plane != 0 {
        return Err(DataError::format(
            path,
            format!("undecodable JPEG: {w}x{h} image with {} bytes", pixels.len()),
        ));
    }
    let comps = pixels.len() / plane;
    let shape = ImageShape::new(3, h, w);
    let mut chw = vec![0u8; shape.len()];
    match comps {
        1 => {
            for c in 0..3 {
                chw[c * plane..(c + 1) * plane].copy_from_slice(&pixels);
            }
        }
        3 | 4 => {
            let (r, rest) = chw.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            let planes = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
            for (px, ((r, g), b)) in pixels.chunks_exact(comps).zip(planes) {
                (*r, *g, *b) = (px[0], px[1], px[2]);
            }
        }
        n => {
            return Err(DataError::format(
                path,
                format!("JPEG decoded to {n} components per pixel"),
            ))
        }
    }
    Ok((chw, shape))
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

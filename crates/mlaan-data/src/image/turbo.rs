//! Safe wrapper over `csrc/jpeg_bridge.c`, the C bridge to the system libjpeg-turbo.
//!
//! A [`Decompressor`] is one libjpeg decompression object, reused image after image by one
//! thread ([`with_decompressor`]). [`Decompressor::open`] reads a header and returns a
//! [`Jpeg`] that borrows the file's bytes; [`Jpeg::decode`] decodes a region of the image,
//! optionally scaled down in the DCT domain, and dropping the `Jpeg` ends the decompression
//! (whatever lies below the region is never decoded).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr};
use std::ptr::NonNull;

/// Scans a progressive file may have before it is refused. Encoders write about 10; a crafted
/// file can hold thousands, each a pass over the whole coefficient buffer (libjpeg-turbo's
/// `djpeg -maxscans` exists for this).
pub const MAX_SCANS: i32 = 500;

#[repr(C)]
struct RawJpeg {
    _opaque: [u8; 0],
}

/// Mirrors `struct mlaan_jpeg_header` in jpeg_bridge.c.
#[repr(C)]
#[derive(Default)]
struct RawHeader {
    width: u32,
    height: u32,
    components: i32,
    out_channels: i32,
    adobe_inverted: i32,
    progressive: i32,
    imcu_width: i32,
    imcu_height: i32,
}

extern "C" {
    fn mlaan_jpeg_new(max_scans: c_int) -> *mut RawJpeg;
    fn mlaan_jpeg_free(j: *mut RawJpeg);
    fn mlaan_jpeg_message(j: *const RawJpeg) -> *const c_char;
    fn mlaan_jpeg_truncated(j: *const RawJpeg) -> c_int;
    fn mlaan_jpeg_abort(j: *mut RawJpeg);
    fn mlaan_jpeg_read_header(
        j: *mut RawJpeg,
        data: *const u8,
        len: usize,
        out: *mut RawHeader,
    ) -> c_int;
    fn mlaan_jpeg_start(
        j: *mut RawJpeg,
        denom: u32,
        x: *mut u32,
        w: *mut u32,
        scaled_w: *mut u32,
        scaled_h: *mut u32,
    ) -> c_int;
    fn mlaan_jpeg_read_rows(
        j: *mut RawJpeg,
        y: u32,
        rows: u32,
        out: *mut u8,
        stride: usize,
    ) -> c_int;
}

/// How the decoder delivers the pixels of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// One channel.
    Grey,
    /// Three channels (YCbCr or RGB files).
    Rgb,
    /// Four channels, C, M, Y, K (CMYK or YCCK files); `inverted` when an Adobe APP14 marker
    /// says the values are stored as 255 minus the ink, as Photoshop writes them.
    Cmyk { inverted: bool },
}

impl Color {
    /// Channels per decoded pixel.
    pub fn decoded_channels(self) -> usize {
        match self {
            Color::Grey => 1,
            Color::Rgb => 3,
            Color::Cmyk { .. } => 4,
        }
    }
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub width: usize,
    pub height: usize,
    pub color: Color,
    pub progressive: bool,
    /// iMCU size in full-size pixels: a column crop starts on a multiple of its width.
    pub imcu: (usize, usize),
}

/// A region decoded by [`Jpeg::decode`]: `width`x`height` pixels of `channels` bytes,
/// row-major, whose top-left pixel is (`x`, `y`) in the scaled image.
#[derive(Debug)]
pub struct Region {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

/// One libjpeg decompression object.
pub struct Decompressor {
    raw: NonNull<RawJpeg>,
}

// SAFETY: the object is only ever used through `&mut self` (one thread at a time), and
// libjpeg keeps no thread-affine state in it.
unsafe impl Send for Decompressor {}

impl Decompressor {
    pub fn new() -> Result<Self, String> {
        // SAFETY: returns a fresh object or null.
        let raw = unsafe { mlaan_jpeg_new(MAX_SCANS) };
        NonNull::new(raw)
            .map(|raw| Decompressor { raw })
            .ok_or_else(|| "cannot create a libjpeg decompressor (out of memory)".to_string())
    }

    fn message(&self) -> String {
        // SAFETY: the bridge keeps a NUL-terminated message buffer inside the object.
        let msg = unsafe { CStr::from_ptr(mlaan_jpeg_message(self.raw.as_ptr())) };
        msg.to_string_lossy().into_owned()
    }

    /// Reads the header of `bytes`; the returned [`Jpeg`] decodes from them.
    pub fn open<'a>(&'a mut self, bytes: &'a [u8]) -> Result<Jpeg<'a>, String> {
        let mut h = RawHeader::default();
        // SAFETY: `bytes` outlives the returned `Jpeg`, which is the only user of the source
        // manager pointing at them; `h` is a valid out-parameter.
        let ok = unsafe {
            mlaan_jpeg_read_header(self.raw.as_ptr(), bytes.as_ptr(), bytes.len(), &mut h)
        };
        let mut jpeg = Jpeg { dec: self, _bytes: bytes, header: None, started: false };
        if ok == 0 {
            return Err(jpeg.dec.message());
        }
        let color = match h.out_channels {
            1 => Color::Grey,
            3 => Color::Rgb,
            4 => Color::Cmyk { inverted: h.adobe_inverted != 0 },
            n => return Err(format!("decoder reported {n} output channels")),
        };
        jpeg.header = Some(Header {
            width: h.width as usize,
            height: h.height as usize,
            color,
            progressive: h.progressive != 0,
            imcu: (h.imcu_width.max(1) as usize, h.imcu_height.max(1) as usize),
        });
        Ok(jpeg)
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by mlaan_jpeg_new, freed once.
        unsafe { mlaan_jpeg_free(self.raw.as_ptr()) }
    }
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's decompressor (created on first use).
pub fn with_decompressor<R>(
    f: impl FnOnce(&mut Decompressor) -> Result<R, String>,
) -> Result<R, String> {
    DECOMPRESSOR.with(|cell| {
        // A re-entrant call (none exists) would find the cell borrowed: use a fresh object.
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return f(&mut Decompressor::new()?);
        };
        if slot.is_none() {
            *slot = Some(Decompressor::new()?);
        }
        f(slot.as_mut().expect("decompressor was just created"))
    })
}

/// A JPEG whose header has been read.
pub struct Jpeg<'a> {
    dec: &'a mut Decompressor,
    _bytes: &'a [u8],
    header: Option<Header>,
    started: bool,
}

impl Jpeg<'_> {
    pub fn header(&self) -> Header {
        self.header.expect("a Jpeg is only handed out with its header")
    }

    /// Size of the image scaled by `1/denom`, as libjpeg computes it (rounded up).
    pub fn scaled_size(&self, denom: usize) -> (usize, usize) {
        let h = self.header();
        (h.width.div_ceil(denom), h.height.div_ceil(denom))
    }

    /// Decodes columns `x0..x1` and rows `y0..y1` of the image scaled by `1/denom` (1, 2, 4
    /// or 8) into `out` (resized to fit). The columns start at the iMCU boundary at or left of
    /// `x0`, so the region returned may begin left of `x0`; the rows are exactly `y0..y1`.
    /// Grey files give 1 channel, colour files 3 (RGB), CMYK files 4. Callable once.
    pub fn decode(
        &mut self,
        denom: usize,
        (x0, x1): (usize, usize),
        (y0, y1): (usize, usize),
        out: &mut Vec<u8>,
    ) -> Result<Region, String> {
        if self.started {
            return Err("a JPEG region can be decoded once per header".into());
        }
        if !matches!(denom, 1 | 2 | 4 | 8) {
            return Err(format!("DCT scaling by 1/{denom} is not 1/1, 1/2, 1/4 or 1/8"));
        }
        let (sw, sh) = self.scaled_size(denom);
        if x0 >= x1 || x1 > sw || y0 >= y1 || y1 > sh {
            return Err(format!(
                "region {x0}..{x1} x {y0}..{y1} is empty or outside the {sw}x{sh} image"
            ));
        }
        let to_u32 = |v: usize| u32::try_from(v).map_err(|_| format!("{v} does not fit in u32"));
        let (mut x, mut w) = (to_u32(x0)?, to_u32(x1 - x0)?);
        let (mut full_w, mut full_h) = (0u32, 0u32);
        self.started = true;
        let raw = self.dec.raw.as_ptr();
        // SAFETY: the header was read from `_bytes`, still borrowed; out-parameters are valid.
        if unsafe { mlaan_jpeg_start(raw, denom as u32, &mut x, &mut w, &mut full_w, &mut full_h) }
            == 0
        {
            return Err(self.dec.message());
        }
        if (full_w as usize, full_h as usize) != (sw, sh) {
            return Err(format!(
                "decoder scaled the image to {full_w}x{full_h}, expected {sw}x{sh}"
            ));
        }
        let channels = self.header().color.decoded_channels();
        let (width, height) = (w as usize, y1 - y0);
        let stride = width * channels;
        // Not zero-filled first: libjpeg writes every byte, and the length is set only then.
        out.clear();
        out.reserve(stride * height);
        // SAFETY: `out` has room for `height` rows of `stride` bytes, and libjpeg writes
        // `width` (the cropped output width) pixels of `channels` bytes to each row.
        let ok = unsafe {
            mlaan_jpeg_read_rows(raw, to_u32(y0)?, to_u32(height)?, out.as_mut_ptr(), stride)
        };
        if ok == 0 {
            return Err(self.dec.message());
        }
        // SAFETY: every row was written (read_rows fails otherwise).
        unsafe { out.set_len(stride * height) };
        // SAFETY: plain read of a flag in the object.
        if unsafe { mlaan_jpeg_truncated(raw) } != 0 {
            return Err("truncated (the data ends before the image does)".into());
        }
        Ok(Region { x: x as usize, y: y0, width, height, channels })
    }
}

impl Drop for Jpeg<'_> {
    fn drop(&mut self) {
        // SAFETY: ends the decompression (or does nothing when none was started); the object
        // then no longer points at `_bytes`.
        unsafe { mlaan_jpeg_abort(self.dec.raw.as_ptr()) }
    }
}

//! A small MATLAB level-5 MAT-file reader: enough for numeric arrays (SVHN's `X` and `y`).
//!
//! Layout: a 128-byte header (text, subsystem offset, version, endian indicator `IM`/`MI`),
//! then data elements. Each element has an 8-byte tag (type u32, byte count u32) — or the
//! 4-byte "small data element" form when the count fits in the tag's upper half — and is
//! padded to 8 bytes. `miCOMPRESSED` elements hold a zlib stream of further elements; the
//! published SVHN files wrap each `miMATRIX` that way. A numeric `miMATRIX` holds array flags
//! (class), dimensions, name, and the real part (whose storage type may be narrower than the
//! class: MATLAB stores a `double` array of small integers as `miUINT8`).

use crate::DataError;
use std::io::Read;
use std::path::{Path, PathBuf};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

/// MATLAB array classes (`mxDOUBLE_CLASS` = 6, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatClass {
    Double,
    Single,
    Int8,
    UInt8,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Int64,
    UInt64,
    /// Cells, structs, chars, sparse, objects: listed but not decoded.
    Other(u8),
}

impl MatClass {
    fn from_code(c: u8) -> Self {
        match c {
            6 => MatClass::Double,
            7 => MatClass::Single,
            8 => MatClass::Int8,
            9 => MatClass::UInt8,
            10 => MatClass::Int16,
            11 => MatClass::UInt16,
            12 => MatClass::Int32,
            13 => MatClass::UInt32,
            14 => MatClass::Int64,
            15 => MatClass::UInt64,
            other => MatClass::Other(other),
        }
    }
}

/// The real part of a numeric array in its stored type, in file byte order.
#[derive(Debug, Clone, PartialEq)]
pub struct MatData {
    /// The `mi*` storage type code.
    pub storage: u32,
    pub bytes: Vec<u8>,
    pub big_endian: bool,
}

impl MatData {
    /// Bytes per element of the storage type, `None` for non-numeric storage.
    fn width(storage: u32) -> Option<usize> {
        Some(match storage {
            MI_INT8 | MI_UINT8 | MI_UTF8 => 1,
            MI_INT16 | MI_UINT16 => 2,
            MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
            MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
            _ => return None,
        })
    }
    pub fn len(&self) -> usize {
        Self::width(self.storage).map_or(0, |w| self.bytes.len() / w)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw bytes when stored as `miUINT8` (no conversion, no copy).
    pub fn as_u8(&self) -> Option<&[u8]> {
        (self.storage == MI_UINT8).then_some(&self.bytes[..])
    }
    /// Every element converted to `f64`.
    pub fn to_f64(&self) -> Vec<f64> {
        let Some(w) = Self::width(self.storage) else {
            return Vec::new();
        };
        let be = self.big_endian;
        self.bytes
            .chunks_exact(w)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..w].copy_from_slice(c);
                if be {
                    b[..w].reverse();
                }
                match self.storage {
                    MI_INT8 => c[0] as i8 as f64,
                    MI_UINT8 | MI_UTF8 => c[0] as f64,
                    MI_INT16 => i16::from_le_bytes([b[0], b[1]]) as f64,
                    MI_UINT16 => u16::from_le_bytes([b[0], b[1]]) as f64,
                    MI_INT32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    MI_UINT32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    MI_SINGLE => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    MI_DOUBLE => f64::from_le_bytes(b),
                    MI_INT64 => i64::from_le_bytes(b) as f64,
                    _ => u64::from_le_bytes(b) as f64,
                }
            })
            .collect()
    }
}

/// One top-level variable.
#[derive(Debug, Clone, PartialEq)]
pub struct MatVar {
    pub name: String,
    pub class: MatClass,
    /// MATLAB dimensions; data is column-major (first index fastest).
    pub dims: Vec<usize>,
    /// Real part; `None` for classes that are not numeric.
    pub data: Option<MatData>,
}

/// Parses a whole level-5 MAT file and returns its top-level variables.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Vec<MatVar>, DataError> {
    if bytes.len() < 128 {
        return Err(DataError::format(
            path,
            format!("truncated: {} bytes, shorter than the 128-byte MAT-file header", bytes.len()),
        ));
    }
    let big_endian = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        other => {
            return Err(DataError::format(
                path,
                format!(
                    "not a MATLAB v5 MAT-file: endian indicator {other:?} is neither \"IM\" nor \"MI\"{}",
                    if bytes.starts_with(b"\x89HDF") || bytes[..128].windows(4).any(|w| w == b"7.3 ") {
                        " (MATLAB v7.3 / HDF5 files are not supported)"
                    } else {
                        ""
                    }
                ),
            ))
        }
    };
    let mut p = Parser { path: path.to_path_buf(), big_endian, depth: 0 };
    let mut vars = Vec::new();
    p.elements(bytes, 128, &mut vars)?;
    Ok(vars)
}

struct Parser {
    path: PathBuf,
    big_endian: bool,
    /// Nesting of compressed elements, bounded so hostile input cannot recurse forever.
    depth: usize,
}

/// One element: type, the payload and where the next element starts.
struct Element<'a> {
    ty: u32,
    data: &'a [u8],
    next: usize,
}

impl Parser {
    fn err(&self, offset: usize, reason: impl std::fmt::Display) -> DataError {
        DataError::format(&self.path, format!("at byte {offset}: {reason}"))
    }

    fn u32_at(&self, b: &[u8], at: usize) -> Option<u32> {
        let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(if self.big_endian { u32::from_be_bytes(s) } else { u32::from_le_bytes(s) })
    }

    /// Reads the element tag at `at` within `b` (`base` is `b`'s offset in its stream, for
    /// messages).
    fn element<'a>(&self, b: &'a [u8], at: usize, base: usize) -> Result<Element<'a>, DataError> {
        let first =
            self.u32_at(b, at).ok_or_else(|| self.err(base + at, "truncated element tag"))?;
        if first >> 16 != 0 {
            // Small data element: count in the upper half, payload in the next 4 bytes.
            let (ty, n) = (first & 0xffff, (first >> 16) as usize);
            if n > 4 {
                return Err(
                    self.err(base + at, format!("small data element claims {n} bytes (max 4)"))
                );
            }
            let data = b
                .get(at + 4..at + 4 + n)
                .ok_or_else(|| self.err(base + at, "truncated small data element"))?;
            return Ok(Element { ty, data, next: at + 8 });
        }
        let n = self
            .u32_at(b, at + 4)
            .ok_or_else(|| self.err(base + at, "truncated element tag"))? as usize;
        let start = at + 8;
        let data = b.get(start..start.saturating_add(n)).ok_or_else(|| {
            self.err(
                base + at,
                format!(
                    "truncated: element of type {first} declares {n} bytes but only {} remain",
                    b.len().saturating_sub(start)
                ),
            )
        })?;
        // Compressed elements are not padded; everything else is padded to 8 bytes.
        let next = if first == MI_COMPRESSED { start + n } else { (start + n).div_ceil(8) * 8 };
        Ok(Element { ty: first, data, next })
    }

    /// Parses a sequence of top-level elements starting at `at`.
    fn elements(
        &mut self,
        b: &[u8],
        mut at: usize,
        vars: &mut Vec<MatVar>,
    ) -> Result<(), DataError> {
        while at < b.len() {
            let e = self.element(b, at, 0)?;
            self.top_level(e.ty, e.data, at, vars)?;
            at = e.next;
        }
        Ok(())
    }

    fn top_level(
        &mut self,
        ty: u32,
        data: &[u8],
        at: usize,
        vars: &mut Vec<MatVar>,
    ) -> Result<(), DataError> {
        match ty {
            MI_COMPRESSED => {
                if self.depth >= 4 {
                    return Err(self.err(at, "compressed elements nested too deeply"));
                }
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(data).read_to_end(&mut inflated).map_err(|e| {
                    self.err(at, format!("bad zlib stream in compressed element: {e}"))
                })?;
                self.depth += 1;
                let mut inner_at = 0;
                while inner_at < inflated.len() {
                    let e = self.element(&inflated, inner_at, 0)?;
                    self.top_level(e.ty, e.data, at, vars)?;
                    inner_at = e.next;
                }
                self.depth -= 1;
                Ok(())
            }
            MI_MATRIX => {
                vars.push(self.matrix(data, at)?);
                Ok(())
            }
            // Other top-level elements (none in practice) are skipped.
            _ => Ok(()),
        }
    }

    /// Decodes an `miMATRIX` payload (array flags, dims, name, real part).
    fn matrix(&self, b: &[u8], at: usize) -> Result<MatVar, DataError> {
        let ctx = |what: &str| format!("variable at byte {at}: {what}");
        let flags = self.element(b, 0, at)?;
        if flags.ty != MI_UINT32 || flags.data.len() < 8 {
            return Err(self.err(at, ctx("array flags subelement missing")));
        }
        let class_code = self.u32_at(flags.data, 0).unwrap_or(0) as u8;
        let class = MatClass::from_code(class_code);
        let dims_el = self.element(b, flags.next, at)?;
        if dims_el.ty != MI_INT32 || dims_el.data.len() % 4 != 0 {
            return Err(self.err(at, ctx("dimensions subelement missing")));
        }
        let dims: Vec<usize> = dims_el
            .data
            .chunks_exact(4)
            .map(|c| self.u32_at(c, 0).unwrap_or(0) as i32)
            .map(|d| d.max(0) as usize)
            .collect();
        let name_el = self.element(b, dims_el.next, at)?;
        let name = String::from_utf8_lossy(name_el.data).into_owned();
        let numeric = !matches!(class, MatClass::Other(_));
        let data = if numeric {
            let real = self.element(b, name_el.next, at)?;
            let width = MatData::width(real.ty).ok_or_else(|| {
                self.err(at, format!("variable `{name}`: unsupported storage type {}", real.ty))
            })?;
            let count =
                dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| {
                    self.err(at, format!("variable `{name}`: dimensions {dims:?} overflow"))
                })?;
            if real.data.len() != count.saturating_mul(width) {
                return Err(self.err(
                    at,
                    format!(
                        "variable `{name}`: dimensions {dims:?} need {count} elements but the data holds {}",
                        real.data.len() / width
                    ),
                ));
            }
            Some(MatData {
                storage: real.ty,
                bytes: real.data.to_vec(),
                big_endian: self.big_endian,
            })
        } else {
            None
        };
        Ok(MatVar { name, class, dims, data })
    }
}

/// A numeric variable for [`write()`].
#[derive(Debug, Clone, Copy)]
pub struct WriteVar<'a> {
    pub name: &'a str,
    pub class: MatClass,
    /// MATLAB dimensions; `data` is column-major.
    pub dims: &'a [usize],
    /// Storage type code (see [`storage`]), which may be narrower than `class`.
    pub storage: u32,
    /// Little-endian elements of the storage type.
    pub data: &'a [u8],
}

/// Writes a little-endian level-5 MAT file holding numeric variables (tests, tools); with
/// `compress` each `miMATRIX` is wrapped in a zlib `miCOMPRESSED` element as MATLAB does.
pub fn write(vars: &[WriteVar<'_>], compress: bool) -> Vec<u8> {
    fn tag(out: &mut Vec<u8>, ty: u32, n: usize) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
    }
    fn padded(out: &mut Vec<u8>, ty: u32, data: &[u8]) {
        tag(out, ty, data.len());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    let mut file = vec![b' '; 116];
    file[..22].copy_from_slice(b"MATLAB 5.0 MAT-file, m");
    file.extend_from_slice(&[0; 8]);
    file.extend_from_slice(&0x0100u16.to_le_bytes());
    file.extend_from_slice(b"IM");
    for &WriteVar { name, class, dims, storage, data } in vars {
        let code: u32 = match class {
            MatClass::Double => 6,
            MatClass::Single => 7,
            MatClass::Int8 => 8,
            MatClass::UInt8 => 9,
            MatClass::Int16 => 10,
            MatClass::UInt16 => 11,
            MatClass::Int32 => 12,
            MatClass::UInt32 => 13,
            MatClass::Int64 => 14,
            MatClass::UInt64 => 15,
            MatClass::Other(c) => u32::from(c),
        };
        let mut m = Vec::new();
        padded(&mut m, MI_UINT32, &[code.to_le_bytes(), 0u32.to_le_bytes()].concat());
        let d: Vec<u8> = dims.iter().flat_map(|&d| (d as i32).to_le_bytes()).collect();
        padded(&mut m, MI_INT32, &d);
        padded(&mut m, MI_INT8, name.as_bytes());
        padded(&mut m, storage, data);
        let mut element = Vec::new();
        tag(&mut element, MI_MATRIX, m.len());
        element.extend_from_slice(&m);
        if compress {
            use std::io::Write;
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = z.write_all(&element);
            let zipped = z.finish().unwrap_or_default();
            tag(&mut file, MI_COMPRESSED, zipped.len());
            file.extend_from_slice(&zipped);
        } else {
            file.extend_from_slice(&element);
        }
    }
    file
}

/// Storage type codes for [`write()`].
pub mod storage {
    pub const UINT8: u32 = super::MI_UINT8;
    pub const DOUBLE: u32 = super::MI_DOUBLE;
    pub const SINGLE: u32 = super::MI_SINGLE;
    pub const INT32: u32 = super::MI_INT32;
}

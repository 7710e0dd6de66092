//! TensorBoard event files, written without TensorFlow: the TFRecord framing (length, masked
//! CRC-32C of the length, payload, masked CRC-32C of the payload) around protobuf `Event`
//! messages encoded by hand. Only the handful of fields a scalar or a text summary needs are
//! encoded; field numbers are those of `tensorflow/core/util/event.proto`,
//! `summary.proto` and `tensor.proto`.
//!
//! [`scalars`] says which tags a metrics record becomes, so the tag names live in one place.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mlaan_core::metrics::MetricRecord;

use crate::ReportError;

/// Appends events to one `events.out.tfevents.*` file, flushing after every call so that a
/// TensorBoard watching the directory sees a run live and a crash loses nothing written.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (named as TensorBoard expects:
    /// `events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`) and writes its version record.
    pub fn create(dir: &Path) -> Result<EventWriter, ReportError> {
        let now = unix_seconds();
        let host = hostname();
        let pid = std::process::id();
        let mut n = 0u32;
        loop {
            let path = dir.join(format!("events.out.tfevents.{}.{host}.{pid}.{n}", now as u64));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => {
                    let mut w = EventWriter { path, out: BufWriter::new(f) };
                    w.write_event(&event(now, 0, Payload::FileVersion("brain.Event:2")))?;
                    return Ok(w);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(ReportError::io(&path, e)),
            }
        }
    }

    /// One event at `step` holding a scalar summary per `(tag, value)`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<(), ReportError> {
        if values.is_empty() {
            return Ok(());
        }
        let summary = values.iter().fold(Vec::new(), |mut s, (tag, v)| {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_float(&mut value, 2, *v as f32);
            put_bytes(&mut s, 1, &value);
            s
        });
        self.write_event(&event(unix_seconds(), step, Payload::Summary(&summary)))
    }

    /// A text summary (TensorBoard's Text tab renders it as Markdown).
    pub fn text(&mut self, step: u64, tag: &str, markdown: &str) -> Result<(), ReportError> {
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, 1, DT_STRING);
        put_bytes(&mut tensor, 2, &[]); // TensorShapeProto of a scalar: no dimensions
        put_bytes(&mut tensor, 8, markdown.as_bytes());
        let mut plugin = Vec::new();
        put_bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, 1, &plugin);
        let mut value = Vec::new();
        put_bytes(&mut value, 1, tag.as_bytes());
        put_bytes(&mut value, 8, &tensor);
        put_bytes(&mut value, 9, &metadata);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &value);
        self.write_event(&event(unix_seconds(), step, Payload::Summary(&summary)))
    }

    fn write_event(&mut self, payload: &[u8]) -> Result<(), ReportError> {
        let result = (|| {
            self.out.write_all(&frame(payload))?;
            self.out.flush()
        })();
        result.map_err(|e| ReportError::io(&self.path, e))
    }
}

/// The scalars a metrics record becomes.
///
/// A training record: the network's loss, learning rate, images/s and batches skipped for a
/// non-finite loss; each module's term
/// losses (`term_names[m]` names module m's terms in the order its stage reports them); per
/// stage its images/s, busy and wait shares of wall time, gradient lag and live bytes.
/// An evaluation record: the network's test accuracy and loss, and the test accuracy of
/// every module head that has one.
pub fn scalars(record: &MetricRecord, term_names: &[Vec<String>]) -> Vec<(String, f64)> {
    match record {
        MetricRecord::Train { loss, lr, images_per_s, skipped_batches, stages, .. } => {
            let mut out = vec![
                ("train/loss".to_string(), *loss),
                ("train/lr".to_string(), *lr),
                ("train/images_per_s".to_string(), *images_per_s),
                ("train/skipped_batches".to_string(), *skipped_batches as f64),
            ];
            for w in stages {
                let mut losses = w.loss.iter();
                for &m in &w.modules {
                    for name in term_names.get(m).into_iter().flatten() {
                        if let Some(&l) = losses.next() {
                            out.push((format!("loss/module{m}/{name}"), l));
                        }
                    }
                }
                let share = |ms: f64| if w.wall_ms > 0.0 { ms / w.wall_ms } else { 0.0 };
                let s = w.stage;
                out.extend([
                    (format!("images_per_s/stage{s}"), w.images_per_s),
                    (format!("busy/stage{s}"), share(w.busy_ms)),
                    (format!("wait_input/stage{s}"), share(w.wait_input_ms)),
                    (format!("wait_output/stage{s}"), share(w.wait_output_ms)),
                    (format!("wait_grad/stage{s}"), share(w.wait_grad_ms)),
                    (format!("grad_lag/stage{s}"), w.grad_lag as f64),
                    (format!("live_bytes/stage{s}"), w.live_bytes as f64),
                ]);
                for (phase, ms) in &w.phases_ms {
                    out.push((format!("phase/{phase}/stage{s}"), share(*ms)));
                }
                if w.allreduce_bytes > 0 {
                    out.push((format!("allreduce/stage{s}"), share(w.allreduce_ms)));
                    out.push((format!("allreduce_bytes/stage{s}"), w.allreduce_bytes as f64));
                }
            }
            out
        }
        MetricRecord::Eval { test_accuracy, test_loss, module_accuracy, .. } => {
            let mut out = vec![
                ("eval/accuracy".to_string(), *test_accuracy),
                ("eval/loss".to_string(), *test_loss),
            ];
            for (m, a) in module_accuracy.iter().enumerate() {
                if let Some(a) = a {
                    out.push((format!("eval/module{m}/accuracy"), *a));
                }
            }
            out
        }
    }
}

/// `DataType.DT_STRING` in `types.proto`.
const DT_STRING: u64 = 7;

enum Payload<'a> {
    FileVersion(&'a str),
    /// An encoded `Summary` message.
    Summary(&'a [u8]),
}

/// An encoded `Event`: wall_time = 1 (double), step = 2 (int64), file_version = 3,
/// summary = 5.
fn event(wall_time: f64, step: u64, payload: Payload) -> Vec<u8> {
    let mut e = Vec::new();
    put_tag(&mut e, 1, WIRE_64);
    e.extend_from_slice(&wall_time.to_le_bytes());
    put_varint_field(&mut e, 2, step);
    match payload {
        Payload::FileVersion(v) => put_bytes(&mut e, 3, v.as_bytes()),
        Payload::Summary(s) => put_bytes(&mut e, 5, s),
    }
    e
}

const WIRE_VARINT: u64 = 0;
const WIRE_64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_32: u64 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_tag(out, field, WIRE_VARINT);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_tag(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_float(out: &mut Vec<u8>, field: u64, v: f32) {
    put_tag(out, field, WIRE_32);
    out.extend_from_slice(&v.to_le_bytes());
}

/// One TFRecord: `u64` length, masked CRC of the length, the payload, masked CRC of it.
fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

/// TFRecord's CRC mask: rotate right by 15 bits, add a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            }
            *entry = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The host name for the file name (`localhost` when it cannot be read); characters other
/// than letters, digits, `-` and `_` become `_`, so the name stays one path component.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_".contains(c) { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The check value of CRC-32C (RFC 3720, appendix B.4): "123456789" -> 0xE3069283.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn varints_and_frames_are_laid_out_as_protobuf_and_tfrecord_say() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let f = frame(b"abc");
        assert_eq!(f.len(), 8 + 4 + 3 + 4);
        assert_eq!(&f[..8], &3u64.to_le_bytes());
        assert_eq!(&f[12..15], b"abc");
        assert_eq!(&f[15..], &masked_crc(b"abc").to_le_bytes());
    }
}

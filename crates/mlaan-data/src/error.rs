//! The one error type of the crate. Every variant names the file, record, sample, URL or
//! config key it is about, because a data problem is only fixable once it is located.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not in the expected format (bad magic, truncated, wrong size).
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    /// One record of a multi-record file is bad (label out of range, short record).
    #[error("{}, record {record}: {reason}", path.display())]
    Record { path: PathBuf, record: usize, reason: String },
    /// The dataset's files are not where they were looked for.
    #[error("{dataset}: {reason} (looked in {})", dir.display())]
    NotFound { dataset: String, dir: PathBuf, reason: String },
    /// A `[data]` setting that cannot be used.
    #[error("config key `data.{key}`: {reason}")]
    Config { key: String, reason: String },
    #[error("sample index {index} out of range for {dataset} ({len} samples)")]
    IndexOutOfRange { dataset: String, index: usize, len: usize },
    /// Augmentation could not be applied to a decoded image.
    #[error("augmentation: {0}")]
    Transform(String),
    /// A sample-level failure with the sample's identity attached (transform errors, shape
    /// mismatches inside a batch).
    #[error("{dataset}, sample {index}: {reason}")]
    Sample { dataset: String, index: usize, reason: String },
    #[error("downloading {url} to {}: {reason}", path.display())]
    Download { url: String, path: PathBuf, reason: String },
    #[error("checksum mismatch for {} downloaded from {url}: expected md5 {expected}, got {actual}; the file was not kept", path.display())]
    Checksum { url: String, path: PathBuf, expected: String, actual: String },
    /// The dataset cannot be downloaded by `fetch` (e.g. ImageNet's licence).
    #[error("cannot fetch `{dataset}`: {reason}")]
    NotFetchable { dataset: String, reason: String },
    /// A loader thread died (a bug, not bad data).
    #[error("loader: {0}")]
    Loader(String),
    /// The epoch stream was dropped; only seen by workers, never by the consumer.
    #[error("loader stopped")]
    Cancelled,
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::Format { path: path.into(), reason: reason.into() }
    }
    pub(crate) fn record(
        path: impl Into<PathBuf>,
        record: usize,
        reason: impl Into<String>,
    ) -> Self {
        DataError::Record { path: path.into(), record, reason: reason.into() }
    }
    pub(crate) fn config(key: &str, reason: impl Into<String>) -> Self {
        DataError::Config { key: key.into(), reason: reason.into() }
    }
}

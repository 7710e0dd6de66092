use std::path::{Path, PathBuf};

/// Why a report could not be read or written. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A line of `metrics.jsonl` that is not a metric record (`line` counts from 1).
    #[error("{}:{line}: not a metrics record: {source}", path.display())]
    BadRecord { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("{}: not a bench report: {source}", path.display())]
    BadBench { path: PathBuf, source: serde_json::Error },
    /// A metrics file without a single record.
    #[error("{}: no metric records (the file is empty)", path.display())]
    Empty { path: PathBuf },
    /// The input has nothing that could be drawn (e.g. a bench report without cases).
    #[error("{}: nothing to plot: {what}", path.display())]
    NothingToPlot { path: PathBuf, what: String },
    #[error("{}: drawing failed: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    /// The font embedded in this crate was rejected (never expected).
    #[error("the font embedded in mlaan-report could not be loaded")]
    Font,
}

impl ReportError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ReportError::Io { path: path.to_path_buf(), source }
    }
}

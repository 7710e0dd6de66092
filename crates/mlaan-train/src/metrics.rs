//! Metric sinks: `metrics.jsonl` (one record per line) and the progress bar.

use mlaan_core::metrics::MetricRecord;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Appends one JSON record per line and flushes each, so a crash loses nothing written.
pub struct JsonlWriter {
    out: BufWriter<File>,
}

impl JsonlWriter {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(JsonlWriter { out: BufWriter::new(File::create(path)?) })
    }

    pub fn append(path: &Path) -> std::io::Result<Self> {
        Ok(JsonlWriter {
            out: BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        })
    }

    pub fn write(&mut self, record: &MetricRecord) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

/// A progress bar with rate and ETA on a terminal; hidden otherwise.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

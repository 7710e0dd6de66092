//! Metric sinks: `metrics.jsonl` (one record per line) and the progress bar; TensorBoard
//! event files are `mlaan_report::EventWriter`.

use mlaan_core::metrics::{MetricRecord, StageWindow};
use parking_lot::Mutex;
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

/// The bar being drawn, so that log lines can be printed above it instead of through it.
static ACTIVE_BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// A progress bar with ETA on a terminal; hidden otherwise (a log file gets no bar and no
/// escape codes). Rate and losses go into its message ([`bar_message`]), because the step
/// rate indicatif would show means less than images/s.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    if !bar.is_hidden() {
        *ACTIVE_BAR.lock() = Some(bar.clone());
    }
    bar
}

/// The bar's message for one training window: images/s, the busiest stage's busy share of
/// its wall time (a pipeline is as fast as that stage), loss and learning rate.
pub fn bar_message(images_per_s: f64, stages: &[StageWindow], loss: f64, lr: f64) -> String {
    let busiest = stages.iter().max_by(|a, b| a.busy_fraction().total_cmp(&b.busy_fraction()));
    let busy = match busiest {
        Some(w) if stages.len() > 1 => {
            format!(" · stage {} busy {:.0}%", w.stage, 100.0 * w.busy_fraction())
        }
        _ => String::new(),
    };
    format!("{images_per_s:.0} img/s{busy} · loss {loss:.3} · lr {lr:.4}")
}

/// Runs `print` with the progress bar (if one is drawn) taken off the screen, and draws it
/// again afterwards: how log lines get above the bar.
pub fn above_bar<R>(print: impl FnOnce() -> R) -> R {
    let bar = ACTIVE_BAR.lock().clone();
    match bar {
        Some(b) if !b.is_finished() => b.suspend(print),
        _ => print(),
    }
}

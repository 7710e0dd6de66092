//! Reports for `mlaan-pipe`: turns benchmark results (`bench.json`, [`BenchReport`]) and
//! training logs (`metrics.jsonl`, [`MetricRecord`]) into Markdown tables, PNG plots and
//! TensorBoard event files.
//!
//! No libtorch here. Plots are drawn with `plotters` on a bitmap, with a font embedded in
//! this crate (DejaVu Sans, see `assets/DejaVuSans-LICENSE.txt`), so text renders the same on
//! every machine whether or not it has system fonts. Every file is written atomically (a
//! temporary file in the same folder, then a rename).
//!
//! - [`bench_markdown`]: a Markdown summary of a benchmark run.
//! - [`bench_plots`]: `throughput.png`, `stages.png`, `memory.png`.
//! - [`training_plots`]: `curves.png` (loss, test accuracy, images/s against step).
//! - [`EventWriter`]: TensorBoard event files; [`tensorboard_scalars`] names the tags a
//!   metrics record becomes.
//! - [`read_metrics`], [`read_bench`]: readers whose errors name the file (and line).

mod bench_plots;
mod draw;
mod error;
mod markdown;
mod results;
mod tensorboard;
mod training;

use std::io::Write;
use std::path::Path;

pub use bench_plots::{bench_plots, MEMORY_PNG, STAGES_PNG, THROUGHPUT_PNG};
pub use error::ReportError;
pub use markdown::bench_markdown;
pub use mlaan_core::bench::BenchReport;
pub use mlaan_core::metrics::MetricRecord;
pub use results::{replace_section, results_markdown, ResultRow};
pub use tensorboard::{scalars as tensorboard_scalars, EventWriter};
pub use training::{read_metrics, training_plots, CURVES_PNG};

/// Reads a `bench.json` written by `mlaan-pipe bench`.
pub fn read_bench(path: &Path) -> Result<BenchReport, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|source| ReportError::BadBench { path: path.to_path_buf(), source })
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, then renamed over
/// it. Readers see the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let tmp = draw::temp_path(path, "tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ReportError::io(path, e)
    })
}

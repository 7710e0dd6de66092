//! `mlaan-pipe`: pipeline-parallel supervised local learning (MLAAN, DGL, InfoPro) of ResNets.

mod cli;
mod commands;

use std::io::{IsTerminal, Write};

fn main() {
    mlaan_train::devices::load_cuda_backend();
    mlaan_train::placement::single_threaded_coordinator();
    let args = cli::Cli::parse_checked();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MLAAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if args.quiet { "warn" } else { "info" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogLine::default)
        .with_ansi(colour_on_stderr())
        .with_target(false)
        .init();
    if let Err(e) = commands::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Colour only on a terminal, and not when `NO_COLOR` is set to anything (no-color.org).
fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// One formatted log line, written to stderr above the progress bar when dropped (the
/// formatter drops its writer after each event), so lines never tear the bar.
#[derive(Default)]
struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            mlaan_train::metrics::above_bar(|| {
                let _ = std::io::stderr().lock().write_all(&self.0);
            });
        }
    }
}

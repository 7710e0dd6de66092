//! `mlaan-pipe`: pipeline-parallel supervised local learning (MLAAN, DGL, InfoPro) of ResNets.

mod cli;
mod commands;

use clap::Parser;

fn main() {
    mlaan_train::devices::load_cuda_backend();
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MLAAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if args.quiet { "warn" } else { "info" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = commands::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

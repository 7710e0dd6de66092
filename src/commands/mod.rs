//! One module per subcommand.

mod bench;
mod compare;
mod data;
mod doctor;
mod eval;
mod export;
mod launch;
mod plan;
mod plot;
mod train;

use crate::cli::{Cli, Command};
use anyhow::Result;

pub fn run(cli: Cli) -> Result<()> {
    match cli.into_command() {
        Command::Train(a) => train::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Export(a) => export::run(a),
        Command::Data(c) => data::run(c),
        Command::Bench(a) => bench::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Launch(a) => launch::run(a),
        Command::Doctor(a) => doctor::run(a),
    }
}

/// Write `text` to stdout when `to` is `-`, else into the file `to`.
fn emit(to: &std::path::Path, text: &str) -> Result<()> {
    use anyhow::Context;
    if to.as_os_str() == "-" {
        println!("{text}");
        Ok(())
    } else {
        std::fs::write(to, format!("{text}\n")).with_context(|| format!("writing {}", to.display()))
    }
}

//! One module per subcommand.

mod eval;
mod plan;
mod train;

use crate::cli::{Cli, Command};
use anyhow::Result;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Eval(a) => eval::run(a),
    }
}

//! `mlaan-pipe plan`: the plan report of a config (`mlaan_train::plan_report`), as text or
//! JSON.

use crate::cli::PlanArgs;
use anyhow::Result;
use mlaan_train::plan_report::{build, render};

pub fn run(args: PlanArgs) -> Result<()> {
    let cfg = args.config.resolve()?;
    let report = build(&cfg)?;
    match &args.json {
        Some(to) => super::emit(to, &serde_json::to_string_pretty(&report)?)?,
        None => print!("{}", render(&report, &cfg)),
    }
    if let (Some(note), Some(_)) = (&report.placement.note, &args.json) {
        eprintln!("note: {note}");
    }
    Ok(())
}

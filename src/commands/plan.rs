//! `mlaan-pipe plan`: the plan report of a config (`mlaan_train::plan_report`), as text or
//! JSON.

use crate::cli::PlanArgs;
use anyhow::Result;
use mlaan_train::plan_report::{build, render};

pub fn run(args: PlanArgs) -> Result<()> {
    let cfg = args.config.resolve()?;
    let per_node = match args.nproc_per_node {
        Some(n) => n,
        None => std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(1),
    };
    let report = build(&cfg, &args.config.source().to_string(), per_node)?;
    match &args.json {
        Some(to) => super::emit(to, &serde_json::to_string_pretty(&report)?)?,
        None => print!("{}", render(&report, &cfg)),
    }
    if let (Some(note), Some(_)) = (&report.placement.note, &args.json) {
        eprintln!("note: {note}");
    }
    Ok(())
}

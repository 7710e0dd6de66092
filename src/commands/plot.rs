use crate::cli::PlotArgs;
use anyhow::{bail, Result};

pub fn run(args: PlotArgs) -> Result<()> {
    for dir in &args.dirs {
        let mut made = Vec::new();
        let metrics = dir.join("metrics.jsonl");
        if metrics.is_file() {
            made.extend(mlaan_report::training_plots(&metrics, dir)?);
        }
        let bench = dir.join("bench.json");
        if bench.is_file() {
            let report = mlaan_report::read_bench(&bench)?;
            made.extend(mlaan_report::bench_plots(&report, dir)?);
            mlaan_report::write_atomic(
                &dir.join("bench.md"),
                mlaan_report::bench_markdown(&report).as_bytes(),
            )?;
        }
        if made.is_empty() {
            bail!("{}: neither metrics.jsonl nor bench.json found", dir.display());
        }
        for p in made {
            println!("{}", p.display());
        }
    }
    Ok(())
}

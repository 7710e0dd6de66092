use crate::cli::CompareArgs;
use anyhow::{Context, Result};
use mlaan_core::config::{MethodConfig, RunConfig};
use mlaan_report::ResultRow;
use std::path::Path;

/// What sets a run apart from its method's defaults, read from the run's `config.toml`:
/// today the MLAAN cascade depth, the one setting the method comparison varies.
fn variant(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok(None);
    }
    let cfg =
        RunConfig::load(Some(&path), &[]).with_context(|| format!("reading {}", path.display()))?;
    let depth = cfg.method.cascade_depth;
    Ok((cfg.method.name.is_mlaan() && depth != MethodConfig::default().cascade_depth)
        .then(|| format!("d={depth}")))
}

pub fn run(args: CompareArgs) -> Result<()> {
    let rows = args
        .runs
        .iter()
        .map(|dir| {
            let path = dir.join("summary.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            let field = |k: &str| v.get(k).with_context(|| format!("{}: no `{k}`", path.display()));
            Ok(ResultRow {
                method: field("method")?.as_str().unwrap_or("?").to_string(),
                variant: variant(dir)?,
                arch: field("arch")?.as_str().unwrap_or("?").to_string(),
                k: field("k")?.as_u64().unwrap_or(0) as usize,
                seed: v.get("seed").and_then(|s| s.as_u64()).unwrap_or(0),
                epochs: field("epochs")?.as_u64().unwrap_or(0) as usize,
                test_accuracy: field("test_accuracy")?.as_f64().unwrap_or(f64::NAN),
                module_accuracy: field("module_accuracy")?
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_f64()).collect())
                    .unwrap_or_default(),
                images_per_s: field("train_images_per_s")?.as_f64().unwrap_or(0.0),
                run: dir.display().to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let md = mlaan_report::results_markdown(&args.title, &args.command, &rows);
    if let Some(path) = &args.markdown {
        mlaan_report::write_atomic(path, md.as_bytes())?;
    }
    println!("{md}");
    Ok(())
}

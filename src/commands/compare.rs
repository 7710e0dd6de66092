use crate::cli::CompareArgs;
use anyhow::{Context, Result};
use mlaan_core::config::{MethodConfig, RunConfig, Schedule};
use mlaan_report::ResultRow;
use std::path::Path;

/// What sets a run apart from the comparison's reference settings, read from the run's
/// `config.toml`: a schedule other than `sequential` over several stages, and for MLAAN a
/// cascade depth or EMA rule other than the defaults, or the official code's LAM chains.
/// Runs with different variants are rows of their own.
fn variant(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok(None);
    }
    let cfg =
        RunConfig::load(Some(&path), &[]).with_context(|| format!("reading {}", path.display()))?;
    let defaults = MethodConfig::default();
    let m = &cfg.method;
    let mut parts = Vec::new();
    // One stage holds every module, and then every schedule computes what `sequential` does.
    let stages = cfg.pipeline.devices.len();
    if stages > 1 && cfg.pipeline.schedule != Schedule::Sequential {
        parts.push(format!("{}, {stages} stages", cfg.pipeline.schedule));
    }
    if m.name.is_mlaan() {
        if m.cascade_depth != defaults.cascade_depth {
            parts.push(format!("d={}", m.cascade_depth));
        }
        if m.ema_update != defaults.ema_update {
            parts.push(format!("ema_update={}", m.ema_update.name()));
        }
        if m.lam.source == "official" {
            parts.push("official chains".to_string());
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join(", ")))
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
    let level = if args.section.is_some() { 2 } else { 1 };
    let md = mlaan_report::results_markdown(&args.title, level, &args.command, &rows);
    if let Some(path) = &args.markdown {
        let page = match &args.section {
            None => md.clone(),
            Some(name) => {
                let old = match std::fs::read_to_string(path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
                };
                mlaan_report::replace_section(&old, name, &md)
                    .map_err(|e| anyhow::anyhow!("section `{name}` of {}: {e}", path.display()))?
            }
        };
        mlaan_report::write_atomic(path, page.as_bytes())?;
    }
    println!("{md}");
    Ok(())
}

//! `mlaan-pipe eval`: the saved backbone alone (stem, blocks, classifier; no auxiliary
//! networks) on the test set, built as one module whatever split it was trained with — the
//! parameter names do not depend on the split. Files written by `export` load too. The test
//! set goes through a one-stage pipeline, the path `train` evaluates by.

use crate::cli::EvalArgs;
use anyhow::{bail, Context, Result};
use mlaan_core::config::{Method, RunConfig, Schedule};
use mlaan_core::split::SplitSpec;
use mlaan_models::module::LocalNets;
use mlaan_train::evaluate::evaluate_module;
use mlaan_train::session::plan_for;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What `eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub arch: String,
    pub dataset: String,
    pub device: String,
    pub samples: i64,
    pub test_accuracy: f64,
    pub test_loss: f64,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let (model, run_config) = locate(&args.model)?;
    let mut config = args.config.clone();
    if config.config.is_none() {
        if let Some(c) = run_config {
            tracing::info!("using the run's config {}", c.display());
            config.config = Some(c);
        }
    }
    let cfg = config.resolve()?;
    let report = evaluate(&cfg, &model)?;
    let line = format!(
        "{} on {} test ({} images, {}): test accuracy {:.4}, loss {:.4} ({})",
        report.arch,
        report.dataset,
        report.samples,
        report.device,
        report.test_accuracy,
        report.test_loss,
        report.model
    );
    match &args.json {
        // JSON owns stdout; the summary line goes to stderr.
        Some(to) if to.as_os_str() == "-" => eprintln!("{line}"),
        _ => println!("{line}"),
    }
    if let Some(to) = &args.json {
        super::emit(to, &serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// The weights file and, when it sits in a run directory, the run's `config.toml`.
fn locate(model: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let (file, dir) = if model.is_dir() {
        let file = model.join("model.safetensors");
        if !file.is_file() {
            bail!(
                "{} is a directory without model.safetensors (is it a finished run directory?)",
                model.display()
            );
        }
        (file, Some(model.to_path_buf()))
    } else if model.is_file() {
        (model.to_path_buf(), model.parent().map(Path::to_path_buf))
    } else {
        bail!("model {} does not exist", model.display());
    };
    let config = dir.map(|d| d.join("config.toml")).filter(|c| c.is_file());
    Ok((file, config))
}

/// Evaluate the backbone in `model` on the test set of `cfg`'s dataset.
pub fn evaluate(cfg: &RunConfig, model: &Path) -> Result<EvalReport> {
    let data = mlaan_data::open(&cfg.data).context("opening the dataset")?;
    // The whole backbone as one module, on one stage.
    let mut whole = cfg.clone();
    whole.method.name = Method::E2e;
    whole.model.k = 1;
    whole.model.split = SplitSpec::default();
    whole.pipeline.schedule = Schedule::Sequential;
    whole.pipeline.micro_batches = 1;
    let plan = plan_for(&whole, &data)?;
    let image = data.info.image();
    let device = mlaan_train::devices::resolve(&cfg.pipeline.devices[..1])?[0];
    // Built on the CPU to check and load the file; the stage copies it to `device`.
    let nets = mlaan_engine::init::build_nets(&plan, 0, image, Device::Cpu);
    load_backbone(&nets, model).with_context(|| {
        format!(
            "loading {} into {} ({} input, {} classes)",
            model.display(),
            cfg.model.arch,
            data.info.train_shape,
            data.info.num_classes
        )
    })?;
    let result = evaluate_module(&whole, &data, plan, nets.state(), device)?;
    let output = result.modules.iter().max_by_key(|m| m.module);
    let seen = output.map_or(0, |m| m.seen);
    if seen == 0 {
        bail!("the test set of {} is empty", data.info.name);
    }
    Ok(EvalReport {
        model: model.display().to_string(),
        arch: cfg.model.arch.clone(),
        dataset: data.info.name.clone(),
        device: device_name(device),
        samples: seen,
        test_accuracy: result.accuracy(),
        test_loss: result.loss(),
    })
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// Copy the tensors of `path` into `nets` by name; every tensor of the network must be in
/// the file with its shape, and the file must hold nothing else.
fn load_backbone(nets: &LocalNets, path: &Path) -> Result<()> {
    let file = Tensor::read_safetensors(path)
        .with_context(|| format!("reading {} as safetensors", path.display()))?;
    let given: HashMap<&str, &Tensor> = file.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let state = nets.state();
    let wanted: HashMap<&str, &Tensor> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut missing: Vec<&str> =
        wanted.keys().filter(|n| !given.contains_key(*n)).copied().collect();
    // `num_batches_tracked` counters come with exported (torchvision-style) files; the
    // network keeps none.
    let mut extra: Vec<&str> = given
        .keys()
        .filter(|n| !wanted.contains_key(*n) && !n.ends_with(".num_batches_tracked"))
        .copied()
        .collect();
    let mut shapes: Vec<String> = wanted
        .iter()
        .filter_map(|(n, t)| {
            let g = given.get(n)?;
            (g.size() != t.size()).then(|| {
                format!("`{n}` is {:?} in the network but {:?} in the file", t.size(), g.size())
            })
        })
        .collect();
    missing.sort_unstable();
    extra.sort_unstable();
    shapes.sort_unstable();
    let list = |v: &[&str]| {
        let shown: Vec<String> = v.iter().take(12).map(|n| format!("`{n}`")).collect();
        let more = v.len().saturating_sub(12);
        format!(
            "{}{}",
            shown.join(", "),
            if more > 0 { format!(" (+{more} more)") } else { String::new() }
        )
    };
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "{} tensor(s) missing from the file: {}",
            missing.len(),
            list(&missing)
        ));
    }
    if !extra.is_empty() {
        problems.push(format!(
            "{} tensor(s) in the file that the network does not have: {}",
            extra.len(),
            list(&extra)
        ));
    }
    if !shapes.is_empty() {
        let more = shapes.len().saturating_sub(12);
        shapes.truncate(12);
        problems.push(format!(
            "shape mismatch: {}{}",
            shapes.join("; "),
            if more > 0 { format!(" (+{more} more)") } else { String::new() }
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    let _guard = tch::no_grad_guard();
    for (name, t) in &state {
        let mut t = t.shallow_clone();
        t.f_copy_(given[name.as_str()]).with_context(|| format!("copying `{name}`"))?;
    }
    Ok(())
}

//! `mlaan-pipe export`: the backbone of a run or checkpoint as the state dict of the library
//! model it is (torchvision's ResNets and VGGs, timm's ViTs).

use crate::cli::ExportArgs;
use anyhow::Result;
use mlaan_core::arch::ArchSpec;
use mlaan_core::config::RunConfig;
use mlaan_train::export;
use std::path::Path;

pub fn run(args: ExportArgs) -> Result<()> {
    let backbone = export::load(&args.source)?;
    let state = export::torchvision_state(&backbone.tensors, backbone.steps);
    export::write(&state, &args.out)?;
    let params: i64 = backbone.tensors.iter().map(|(_, t)| t.numel() as i64).sum();
    println!(
        "wrote {} ({} tensors, {params} values) from {}",
        args.out.display(),
        state.len(),
        backbone.source
    );
    if let Some(hint) = load_hint(&args.source, &state) {
        println!("{hint}");
    }
    Ok(())
}

/// How to load the file in PyTorch, when the run's config says which backbone it is.
fn load_hint(source: &Path, state: &[(String, tch::Tensor)]) -> Option<String> {
    let dir = if source.is_file() { source.parent()? } else { source };
    // A checkpoint directory sits in `<run>/ckpt/`.
    let config = [dir.join("config.toml"), dir.join("../../config.toml")]
        .into_iter()
        .find(|p| p.is_file())?;
    let cfg = RunConfig::load(Some(&config), &[]).ok()?;
    let arch = ArchSpec::from_name(&cfg.model.arch).ok()?;
    Some(export::load_lines(&arch, state))
}

//! `mlaan-pipe export`: the backbone of a run or checkpoint as a torchvision-style state dict.

use crate::cli::ExportArgs;
use anyhow::Result;
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
    if let Some(hint) = torchvision_hint(&args.source) {
        println!("{hint}");
    }
    Ok(())
}

/// How to load the file in PyTorch, when the run's config says which ResNet it is.
fn torchvision_hint(source: &Path) -> Option<String> {
    let dir = if source.is_file() { source.parent()? } else { source };
    // A checkpoint directory sits in `<run>/ckpt/`.
    let config = [dir.join("config.toml"), dir.join("../../config.toml")]
        .into_iter()
        .find(|p| p.is_file())?;
    let cfg = RunConfig::load(Some(&config), &[]).ok()?;
    let arch = cfg.model.arch.as_str();
    let imagenet = matches!(arch, "resnet18" | "resnet34" | "resnet50" | "resnet101" | "resnet152");
    Some(if imagenet {
        format!(
            "load in PyTorch: m = torchvision.models.{arch}(num_classes=N); \
             m.load_state_dict(safetensors.torch.load_file(PATH)) (3-channel input)"
        )
    } else {
        format!(
            "{arch} is a CIFAR ResNet, which torchvision does not define; the names follow \
             its convention (conv1, bn1, layerN.M.convK, downsample.0/1, fc)"
        )
    })
}

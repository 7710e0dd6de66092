//! `mlaan-pipe export`: the trained backbone alone, as a PyTorch-style state dict in
//! safetensors. Backbone names already follow the published models — torchvision's ResNets
//! (`conv1`, `layer2.3.conv1.weight`, `fc.weight`) and `vgg*_bn` (`features.14.weight`,
//! `classifier.0.weight`), timm's `VisionTransformer` (`patch_embed.proj.weight`,
//! `cls_token`, `pos_embed`, `blocks.7.attn.qkv.weight`, `norm.weight`, `head.weight`) —
//! in their layouts; export adds what torchvision's state dict has and training does not
//! keep — a `num_batches_tracked` counter per batch norm — and drops everything local learning
//! adds (auxiliary networks, LAM copies, EMA twins), so that the library's model
//! (`torchvision.models.resnet34(num_classes=N)`, `timm.create_model("vit_small_patch16_224",
//! num_classes=N)`, ...) accepts the file with `load_state_dict(strict=True)` where the
//! architecture matches; [`load_lines`] says how for each backbone.

use crate::checkpoint;
use anyhow::{bail, Context, Result};
use mlaan_core::arch::{ArchSpec, Backbone as Net, Family, VggForm};
use mlaan_engine::wire::ModuleSnapshot;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A finished run's `model.safetensors`.
    Model(PathBuf),
    /// A complete checkpoint directory.
    Checkpoint(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Model(p) => write!(f, "model {}", p.display()),
            Source::Checkpoint(p) => write!(f, "checkpoint {}", p.display()),
        }
    }
}

/// A backbone ready to write.
pub struct Backbone {
    pub source: Source,
    /// Optimizer steps behind the weights, when known (the batch-norm counters).
    pub steps: Option<u64>,
    pub tensors: Vec<(String, Tensor)>,
}

/// Whether a state name belongs to the backbone (not to auxiliary networks or EMA twins).
pub fn is_backbone(name: &str) -> bool {
    !name.starts_with("aux.") && !name.starts_with("ema.")
}

/// The backbone tensors of trained module snapshots, in module order.
pub fn backbone_of(modules: &[ModuleSnapshot]) -> Vec<(String, Tensor)> {
    modules
        .iter()
        .flat_map(|s| s.state.iter())
        .filter(|(n, _)| is_backbone(n))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

/// Read the backbone from a run directory (its `model.safetensors`, else its newest complete
/// checkpoint), a checkpoint directory, or a safetensors file.
pub fn load(path: &Path) -> Result<Backbone> {
    if path.is_file() {
        return from_model(path, path.parent().and_then(steps_of_run));
    }
    if !path.is_dir() {
        bail!("{} does not exist", path.display());
    }
    if path.join("meta.json").is_file() {
        return from_checkpoint(checkpoint::read(path)?);
    }
    let model = path.join("model.safetensors");
    if model.is_file() {
        return from_model(&model, steps_of_run(path));
    }
    let root = path.join("ckpt");
    match checkpoint::latest(&root)? {
        Some(c) => from_checkpoint(c),
        None => bail!(
            "{} has neither model.safetensors (a finished run) nor a complete checkpoint in {}",
            path.display(),
            root.display()
        ),
    }
}

fn from_model(file: &Path, steps: Option<u64>) -> Result<Backbone> {
    let tensors = Tensor::read_safetensors(file)
        .with_context(|| format!("reading {} as safetensors", file.display()))?;
    if let Some((n, _)) = tensors.iter().find(|(n, _)| !is_backbone(n)) {
        bail!("{}: `{n}` is not a backbone tensor", file.display());
    }
    Ok(Backbone { source: Source::Model(file.to_path_buf()), steps, tensors })
}

fn from_checkpoint(c: checkpoint::Checkpoint) -> Result<Backbone> {
    Ok(Backbone {
        source: Source::Checkpoint(c.dir.clone()),
        steps: Some(c.meta.step),
        tensors: backbone_of(&c.modules),
    })
}

/// Training steps recorded in a run directory's `summary.json`.
fn steps_of_run(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("steps")?.as_u64()
}

/// The state dict torchvision's ResNet has for these weights: float32 parameters and running
/// statistics on the CPU, plus an int64 `num_batches_tracked` after each batch norm's
/// `running_var` (the step count when known, else 0; PyTorch only reads it when a batch
/// norm's momentum is None).
pub fn torchvision_state(
    tensors: &[(String, Tensor)],
    steps: Option<u64>,
) -> Vec<(String, Tensor)> {
    let counter = Tensor::from(steps.unwrap_or(0) as i64);
    let mut out = Vec::with_capacity(tensors.len() * 5 / 4);
    for (name, t) in tensors {
        if name.ends_with(".num_batches_tracked") {
            continue;
        }
        let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        out.push((name.clone(), t));
        if let Some(bn) = name.strip_suffix(".running_var") {
            out.push((format!("{bn}.num_batches_tracked"), counter.copy()));
        }
    }
    out
}

/// The Python lines that load an export of `arch` (whose tensors are `state`) into the
/// library model with `strict=True`; the classes, and a ViT's image size and channels, are
/// read off the tensors.
pub fn load_lines(arch: &ArchSpec, state: &[(String, Tensor)]) -> String {
    let shape = |name: &str| state.iter().find(|(n, _)| n == name).map(|(_, t)| t.size());
    let rows = |name: &str| shape(name).map_or(0, |s| s[0]);
    let load = "m.load_state_dict(safetensors.torch.load_file(PATH), strict=True)";
    let name = &arch.name;
    match &arch.backbone {
        Net::ResNet(r) if r.family == Family::ImageNet => format!(
            "load in PyTorch: m = torchvision.models.{name}(num_classes={}); {load} (3-channel \
             input)",
            rows("fc.weight")
        ),
        Net::ResNet(_) => format!(
            "{name} is a CIFAR ResNet, which torchvision does not define; the names follow its \
             convention (conv1, bn1, layerN.M.convK, downsample.0/1, fc)"
        ),
        Net::Vit(v) => {
            let chans = shape("patch_embed.proj.weight").map_or(3, |s| s[1]);
            let tokens = shape("pos_embed").map_or(1, |s| s[1]);
            let side = ((tokens - 1) as f64).sqrt().round() as i64 * v.patch as i64;
            format!(
                "load in PyTorch: m = timm.models.vision_transformer.VisionTransformer(\
                 img_size={side}, patch_size={}, in_chans={chans}, num_classes={}, \
                 embed_dim={}, depth={}, num_heads={}); {load}",
                v.patch,
                rows("head.weight"),
                v.width,
                v.depth,
                v.heads
            )
        }
        Net::Vgg(g) => {
            let depth = g.depths.iter().sum::<usize>() + 3;
            let chans = shape("features.0.weight").map_or(3, |s| s[1]);
            let first = if chans != 3 || g.widths[0] != 64 {
                format!("m.features[0] = torch.nn.Conv2d({chans}, {}, 3, padding=1); ", g.widths[0])
            } else {
                String::new()
            };
            let build = if g.widths[0] == 64 {
                format!("m = torchvision.models.vgg{depth}_bn(num_classes=N)")
            } else {
                let mut cfg = Vec::new();
                for (&n, &w) in g.depths.iter().zip(&g.widths) {
                    cfg.extend(std::iter::repeat_n(w.to_string(), n));
                    cfg.push("\"M\"".to_string());
                }
                format!(
                    "from torchvision.models.vgg import VGG, make_layers; m = VGG(make_layers([{}], \
                     batch_norm=True), num_classes=N)",
                    cfg.join(", ")
                )
            };
            match g.form {
                VggForm::ImageNet => format!(
                    "load in PyTorch: {}; {first}{load}",
                    build.replace("num_classes=N", &format!("num_classes={}", rows("classifier.6.weight")))
                ),
                VggForm::Cifar => format!(
                    "load in PyTorch: {build}; {first}m.features[-1] = torch.nn.AdaptiveMaxPool2d(1); \
                     m.avgpool = torch.nn.Identity(); m.classifier = torch.nn.Linear({}, {}); {load}",
                    g.widths[g.widths.len() - 1],
                    rows("classifier.weight")
                )
                .replace("num_classes=N", &format!("num_classes={}", rows("classifier.weight"))),
            }
        }
    }
}

/// Write `tensors` to `path` atomically (a temporary file renamed into place).
pub fn write(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    Tensor::write_safetensors(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_every_batch_norm_and_nothing_else() {
        let t = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let names =
            ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"];
        let tensors: Vec<_> = names.iter().map(|n| (n.to_string(), t.copy())).collect();
        let out = torchvision_state(&tensors, Some(42));
        let got: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            got,
            [
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var",
                "bn1.num_batches_tracked"
            ]
        );
        let counter = &out[5].1;
        assert_eq!(counter.kind(), Kind::Int64);
        assert_eq!(counter.dim(), 0);
        assert_eq!(counter.int64_value(&[]), 42);
        // Exporting an export changes nothing.
        let again = torchvision_state(&out, Some(42));
        assert_eq!(again.len(), out.len());
    }
}

//! Rules between sections: what a method needs of the model, and what micro-batches and the
//! schedule allow. Each blames the key a user would change.

use super::{bad_value, Backend, MemoryFormat, Method, RunConfig, Schedule};
use crate::arch::ArchSpec;
use crate::error::ConfigError;

/// A local method (every one but e2e) needs at least two modules to be local about.
pub(super) fn method_fits_model(cfg: &RunConfig) -> Result<(), ConfigError> {
    let method = cfg.method.name;
    if method.is_local() && cfg.model.k < 2 {
        return Err(bad_value(
            "model.k",
            cfg.model.k,
            &format!("method {method} needs at least 2 modules"),
        ));
    }
    Ok(())
}

/// A head reads what the backbone makes: token sequences (`cls-fc`, `mean-fc`) from a ViT,
/// feature maps (`gap-fc`, `1c2f`, `dgl`) from a ResNet or a VGG. Call after the model's own
/// checks (the architecture is known).
pub(super) fn head_fits_model(cfg: &RunConfig) -> Result<(), ConfigError> {
    let (Some(head), Ok(arch)) = (cfg.method.head, ArchSpec::from_name(&cfg.model.arch)) else {
        return Ok(());
    };
    let vit = arch.vit().is_some();
    if head.reads_tokens() != vit {
        let fits = if vit { "cls-fc or mean-fc" } else { "gap-fc, 1c2f or dgl" };
        let what = if vit { "token sequences" } else { "feature maps" };
        return Err(bad_value(
            "method.head",
            head.name(),
            &format!("{} makes {what}: use {fits}", arch.name),
        ));
    }
    Ok(())
}

/// Channels-last re-lays 4-d feature maps; a ViT's activations are token sequences (N, T, D)
/// and only its patch embedding is a convolution, so the layout would change nothing.
pub(super) fn layout_fits_model(cfg: &RunConfig) -> Result<(), ConfigError> {
    let vit = ArchSpec::from_name(&cfg.model.arch).is_ok_and(|a| a.vit().is_some());
    if vit && cfg.train.memory_format == MemoryFormat::ChannelsLast {
        return Err(bad_value(
            "train.memory_format",
            "channels-last",
            &format!(
                "does not apply to {}: its activations are token sequences (N, T, D), not \
                 images, and only the patch embedding is a convolution; use contiguous",
                cfg.model.arch
            ),
        ));
    }
    Ok(())
}

/// Micro-batches divide the training batch, and exist only under a schedule that accumulates
/// them before stepping (`sync` or `sequential`; `async` steps on every batch).
pub(super) fn micro_batches_fit(cfg: &RunConfig) -> Result<(), ConfigError> {
    let p = &cfg.pipeline;
    let batch_size = cfg.train.batch_size;
    if p.micro_batches == 0 || !batch_size.is_multiple_of(p.micro_batches) {
        return Err(bad_value(
            "pipeline.micro_batches",
            p.micro_batches,
            &format!("must be ≥ 1 and divide train.batch_size ({batch_size})"),
        ));
    }
    if p.micro_batches > 1 && p.schedule == Schedule::Async {
        return Err(bad_value(
            "pipeline.micro_batches",
            p.micro_batches,
            "gradient accumulation over micro-batches (GPipe for e2e) needs schedule sync \
             or sequential: async steps on every batch",
        ));
    }
    Ok(())
}

/// End-to-end training over several modules is pipelined backprop: every module waits for
/// the gradient of the one after it, which `async` does not.
pub(super) fn e2e_is_not_async(cfg: &RunConfig) -> Result<(), ConfigError> {
    if cfg.method.name == Method::E2e && cfg.model.k > 1 && cfg.pipeline.schedule == Schedule::Async
    {
        return Err(bad_value(
            "pipeline.schedule",
            "async",
            "e2e over several modules is pipelined backprop (GPipe): use sync",
        ));
    }
    Ok(())
}

/// NCCL reduces GPU memory: asked for by name, every stage must be on a CUDA device (`auto`
/// takes Gloo for CPU stages by itself).
pub(super) fn nccl_needs_gpus(cfg: &RunConfig) -> Result<(), ConfigError> {
    let cpu = cfg.pipeline.devices.iter().position(|d| !d.is_cuda());
    if let (Backend::Nccl, Some(i)) = (cfg.distributed.backend, cpu) {
        return Err(bad_value(
            "distributed.backend",
            "nccl",
            &format!(
                "NCCL all-reduces GPU memory, but stage device {i} is {}: use --gpus, or \
                 backend \"gloo\" (or \"auto\", which takes Gloo for CPU stages)",
                cfg.pipeline.devices[i]
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::load::load_text as load;
    use super::*;

    #[test]
    fn heads_and_layouts_fit_the_backbone() {
        let vit = ["model.arch=\"vit-tiny-p4\"", "model.k=4", "method.name=\"dgl\""];
        load("", &vit).unwrap();
        load("", &[&vit[..], &["method.head=\"mean-fc\""]].concat()).unwrap();
        let e = load("", &[&vit[..], &["method.head=\"1c2f\""]].concat()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("method.head") && e.contains("cls-fc or mean-fc"), "{e}");
        let e = load("", &["model.arch=\"vgg11-cifar\"", "method.head=\"cls-fc\""])
            .unwrap_err()
            .to_string();
        assert!(e.contains("method.head") && e.contains("gap-fc, 1c2f or dgl"), "{e}");
        let e = load("", &[&vit[..], &["train.memory_format=\"channels-last\""]].concat())
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.memory_format") && e.contains("token sequences"), "{e}");
        load("", &["model.arch=\"vgg11-cifar\"", "train.memory_format=\"channels-last\""]).unwrap();
    }

    #[test]
    fn nccl_by_name_needs_every_stage_on_a_gpu() {
        let gpus = "pipeline.devices=[\"cuda:0\",\"cuda:1\"]";
        let c = load("", &["distributed.backend=nccl", gpus]).unwrap();
        assert_eq!(c.distributed.backend, Backend::Nccl);
        let e = load("", &["distributed.backend=nccl", "pipeline.devices=[\"cuda:0\",\"cpu\"]"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("distributed.backend") && e.contains("stage device 1 is cpu"), "{e}");
        // `auto` (the default) and `gloo` take CPU stages.
        assert_eq!(load("", &[]).unwrap().distributed.backend, Backend::Auto);
        load("", &["distributed.backend=gloo"]).unwrap();
        let e = load("", &["distributed.backend=mpi"]).unwrap_err().to_string();
        assert!(e.contains("`mpi`") && e.contains("`nccl`"), "{e}");
    }
}

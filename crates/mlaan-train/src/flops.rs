//! Training FLOPs per sample, per module. The forward multiply-accumulates of the backbone and
//! of every loss term (heads, decoders, LAM chains) are counted by running them once on a small
//! batch, so nothing is modelled by hand. The backward passes are priced the usual way, at
//! 2 FLOPs per MAC: a pass that gives parameters their gradients costs twice its forward (the
//! activation gradients through every layer, and the weight gradients), and a pass only to the
//! input costs its forward once. The backbone runs forward, one pass to its parameters, a
//! separate pass to its input when some gradient goes on to the previous module and others do
//! not (one pass does both when all go on), and forward again in recompute mode. Each term runs
//! forward and one pass to its parameters and to h. EMA twins inside a LAM chain are counted as
//! trained (a small overestimate: they need no weight gradient).

use anyhow::Result;
use mlaan_core::plan::{ImageSpec, NetworkPlan};
use mlaan_engine::init::build_nets;
use mlaan_models::layers::{count_macs, Mode};
use mlaan_models::module::Targets;
use tch::{Device, Kind, Tensor};

/// One module's arithmetic per sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ModuleFlops {
    /// Forward multiply-accumulates of the backbone part.
    pub backbone_macs: f64,
    /// Forward multiply-accumulates of every loss term together.
    pub term_macs: f64,
    /// FLOPs of one training step, forward and backward, per sample.
    pub train_flops: f64,
}

/// Every module's arithmetic per sample; `recompute` adds the second forward of recompute mode.
pub fn module_flops(
    plan: &NetworkPlan,
    image: ImageSpec,
    recompute: bool,
) -> Result<Vec<ModuleFlops>> {
    const N: i64 = 2;
    let _guard = tch::no_grad_guard();
    let [h, w] = image.size;
    let picture =
        Tensor::zeros([N, image.channels as i64, h as i64, w as i64], (Kind::Float, Device::Cpu));
    let labels = Tensor::zeros([N], (Kind::Int64, Device::Cpu));
    let mut x = picture.shallow_clone();
    let mut out = Vec::with_capacity(plan.k());
    for m in 0..plan.k() {
        let nets = build_nets(plan, m, image, Device::Cpu);
        let (h_m, backbone) = count_macs(|| nets.forward(&x, Mode::Eval));
        let targets = Targets { labels: &labels, image: Some(&picture) };
        let terms: u64 = (0..nets.terms.len())
            .map(|t| count_macs(|| nets.term_loss(t, &h_m, &targets, Mode::Eval)).1)
            .sum();
        let routes = mlaan_core::routes::ModuleRoutes::of(plan, m);
        let input_grad = routes.input_grad;
        let separate_input_pass = input_grad && !routes.all_continue;
        let backbone_passes =
            3.0 + f64::from(u8::from(separate_input_pass)) + f64::from(u8::from(recompute));
        let (b, t) = (backbone as f64 / N as f64, terms as f64 / N as f64);
        out.push(ModuleFlops {
            backbone_macs: b,
            term_macs: t,
            train_flops: 2.0 * (b * backbone_passes + 3.0 * t),
        });
        x = h_m;
    }
    Ok(out)
}

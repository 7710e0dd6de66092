//! A short measured profile of each module, for placing K > D modules on D devices: the
//! pipeline runs at the pace of its slowest stage, and a module's cost is far from its
//! backbone FLOPs once heads, LAM chains, cascade passes and recomputation are counted.

use crate::error::TrainError;
use crate::init::{build_nets, initial_state, load_state};
use crate::module::{LocalModule, ModuleSettings};
use crate::optim::LrSchedule;
use crate::stage::Stage;
use crate::wire::{BatchTargets, GradPart};
use mlaan_core::config::{OnNonFinite, OptimConfig, Schedule};
use mlaan_core::plan::ImageSpec;
use mlaan_core::plan::NetworkPlan;
use mlaan_core::routes::ModuleRoutes;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Seconds per batch of every module on `device`: forward, local losses, gradient passes and
/// step, plus (async) the recomputation a late cascade gradient costs. Median of `reps` runs
/// after one warm-up, on random data of the real shapes.
pub fn module_costs(
    plan: &NetworkPlan,
    image: ImageSpec,
    device: Device,
    batch: usize,
    schedule: Schedule,
    reps: usize,
) -> Result<Vec<f64>, TrainError> {
    let states = initial_state(plan, image, 0)?;
    let b = batch as i64;
    let mut costs = Vec::with_capacity(plan.k());
    for (m, state) in states.iter().enumerate() {
        let nets = build_nets(plan, m, image, device);
        load_state(&nets, state)?;
        let settings =
            ModuleSettings::for_module(plan, m, LrSchedule::constant(0.0), OptimConfig::default());
        let module = LocalModule::new(nets, settings);
        let mut stage = Stage::new(plan, vec![module], device, None);
        let x = if m == 0 {
            Tensor::randn(
                [b, image.channels as i64, image.size[0] as i64, image.size[1] as i64],
                (Kind::Float, device),
            )
        } else {
            Tensor::randn(plan.output_shape(m - 1, batch), (Kind::Float, device))
        };
        let targets = BatchTargets {
            labels: Tensor::randint(image.classes as i64, [b], (Kind::Int64, device)),
            image_u8: plan.method.uses_infopro_loss().then(|| {
                Tensor::randint(
                    256,
                    [b, image.channels as i64, image.size[0] as i64, image.size[1] as i64],
                    (Kind::Uint8, device),
                )
            }),
        };
        let from_later = ModuleRoutes::of(plan, m).from_later;
        let late = schedule == Schedule::Async && from_later;
        let mut times = Vec::with_capacity(reps);
        for it in 0..=reps as u64 {
            let t = Instant::now();
            let h =
                stage.process(it, &x, &targets, OnNonFinite::Stop)?.output.expect("not dropped");
            stage.finish(it, late)?;
            if late {
                let g = GradPart { reach_left: 0, grad: h.randn_like() };
                stage.late(it, vec![g], true)?;
            } else if from_later {
                // Sync: the parameter pass of the gradient from later waits in `finish`; its
                // cost is already in there. Nothing more to add.
            }
            if device.is_cuda() {
                tch::Cuda::synchronize(match device {
                    Device::Cuda(i) => i as i64,
                    _ => 0,
                });
            }
            if it > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        costs.push(mlaan_core::bench::median(&times));
    }
    Ok(costs)
}

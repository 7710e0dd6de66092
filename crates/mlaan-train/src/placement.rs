//! Which modules run on which device, and how many intra-op threads each CPU stage gets.

use anyhow::Result;
use mlaan_core::config::{Method, PlacementRule, RunConfig, Schedule};
use mlaan_core::device::{cpu_threads_by_cost, cpu_threads_per_stage};
use mlaan_core::placement::{place, Placement};
use mlaan_core::plan::{ImageSpec, NetworkPlan};
use std::time::Instant;
use tch::Device;

/// Largest batch the placement profile runs.
const PROFILE_BATCH: usize = 32;

/// Which modules run on which device: everything on one stage for `sequential` and plain
/// e2e; one module per device when K ≤ D; otherwise contiguous groups balanced by a measured
/// profile (`auto`, `profile`) or by counted training FLOPs (`flops`).
pub fn choose_placement(
    cfg: &RunConfig,
    plan: &NetworkPlan,
    devices: &[Device],
    image: ImageSpec,
    cores: usize,
) -> Result<(Placement, Option<Vec<f64>>)> {
    if cfg.pipeline.schedule == Schedule::Sequential || plan.method == Method::E2e && plan.k() == 1
    {
        return Ok((Placement { groups: std::iter::once(0..plan.k()).collect() }, None));
    }
    let d = devices.len();
    if d == 1 {
        return Ok((Placement { groups: std::iter::once(0..plan.k()).collect() }, None));
    }
    if plan.k() <= d {
        return Ok((place(&plan.module_macs(), d)?, None));
    }
    if cfg.pipeline.placement == PlacementRule::Flops {
        // Training FLOPs, not the backbone's: auxiliary networks and LAM chains can cost
        // several times their module (AugLocal's early networks are most of the network).
        let flops = crate::flops::module_flops(plan, image, cfg.pipeline.recompute)?;
        let costs: Vec<f64> = flops.iter().map(|f| f.train_flops).collect();
        return Ok((place(&costs, d)?, None));
    }
    // Profile on the first device with the threads each stage will have.
    let cpu_stages = devices.iter().filter(|x| **x == Device::Cpu).count();
    let threads = match cfg.pipeline.intra_op_threads {
        0 => cpu_threads_per_stage(cores, cpu_stages),
        n => n,
    };
    let t = Instant::now();
    // Relative costs are what matters: a small batch keeps the profile short on a CPU.
    let batch = cfg.train.batch_size.min(PROFILE_BATCH);
    // On a thread of its own, which takes its OpenMP team with it when it ends (see
    // `single_threaded_coordinator`).
    let costs = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tch::set_num_threads(threads as i32);
                mlaan_engine::profile::module_costs(
                    plan,
                    image,
                    devices[0],
                    batch,
                    cfg.pipeline.schedule,
                    2,
                )
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the placement profile's thread panicked"))
    })??;
    let p = place(&costs, d)?;
    tracing::info!(
        "placement from a {:.1} s profile (ms per batch: {}): {}",
        t.elapsed().as_secs_f64(),
        costs.iter().map(|c| format!("{:.0}", c * 1e3)).collect::<Vec<_>>().join(" "),
        p.groups.iter().map(|g| format!("{}..{}", g.start, g.end)).collect::<Vec<_>>().join(" | ")
    );
    Ok((p, Some(costs)))
}

/// Gives the calling thread, which coordinates the stages, one intra-op thread before it runs
/// any tensor op. libgomp lets its workers spin between parallel regions only while it manages
/// no more threads than there are cores; an idle team kept by this thread pushes the count
/// over, and then every stage's workers sleep and wake by futex between regions (a fifth of
/// an e2e step on 2 cores). Work here that wants threads runs on a thread of its own.
pub fn single_threaded_coordinator() {
    tch::set_num_threads(1);
}

/// The device of each stage.
pub(crate) fn stage_devices(p: &Placement, devices: &[Device]) -> Vec<Device> {
    (0..p.num_stages()).map(|s| devices[s.min(devices.len() - 1)]).collect()
}

/// Intra-op threads of each stage: CPU stages share the cores, in proportion to their
/// measured cost when there is a profile, evenly otherwise (`pipeline.intra_op_threads`
/// overrides). Intra-op parallelism is per thread, so each stage thread sets its own.
pub(crate) fn configure_threads(
    cfg: &RunConfig,
    p: &Placement,
    devices: &[Device],
    module_costs: Option<&[f64]>,
    cores: usize,
) -> Vec<usize> {
    let stage_devs = stage_devices(p, devices);
    let cpu: Vec<usize> = (0..p.num_stages()).filter(|&s| stage_devs[s] == Device::Cpu).collect();
    let even = cpu_threads_per_stage(cores, cpu.len());
    let mut threads = vec![even; p.num_stages()];
    if cfg.pipeline.intra_op_threads > 0 {
        threads = vec![cfg.pipeline.intra_op_threads; p.num_stages()];
    } else if let Some(costs) = module_costs {
        let stage_cost = |s: usize| p.groups[s].clone().map(|m| costs[m]).sum::<f64>();
        let by_cost =
            cpu_threads_by_cost(cores, &cpu.iter().map(|&s| stage_cost(s)).collect::<Vec<_>>());
        for (&s, t) in cpu.iter().zip(by_cost) {
            threads[s] = t;
        }
    }
    tracing::info!("{} stage(s); intra-op threads per stage: {threads:?}", p.num_stages());
    threads
}

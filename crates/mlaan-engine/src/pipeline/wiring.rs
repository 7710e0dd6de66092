//! Building a stage before its thread runs: its modules from their starting state, the EMA
//! channels between real blocks and their twins (possibly on other stages), the stage-0 input
//! preparation and the compute layout.

use super::settings::PipelineSettings;
use crate::error::TrainError;
use crate::init::build_nets;
use crate::module::{EmaLag, LocalModule, ModuleSettings, SourceLink, TwinLink};
use crate::stage::input::InputPrep;
use crate::stage::Stage;
use crate::wire::{EmaSnapshot, Handed, ModuleSnapshot};
use crossbeam_channel::{unbounded, Receiver, Sender};
use mlaan_core::config::{EmaLagRule, MemoryFormat, OnNonFinite, Precision};
use mlaan_core::placement::Placement;
use mlaan_core::plan::NetworkPlan;
use mlaan_core::routes::ModuleRoutes;
use std::collections::HashMap;
use tch::{Device, Tensor};

/// A twin's end of an EMA channel, before its stage has built the twin.
pub struct TwinWire {
    module: usize,
    /// The real unit's name, and the names its parameters live under.
    block: String,
    prefixes: Vec<String>,
    rx: Receiver<Handed<EmaSnapshot>>,
    lag: EmaLag,
}

/// A real block's end of an EMA channel, and the device of the twin it feeds.
pub struct SourceWire {
    module: usize,
    block: String,
    prefixes: Vec<String>,
    tx: Sender<Handed<EmaSnapshot>>,
    to: Device,
}

/// The EMA ends of every stage, by stage.
pub struct EmaWires {
    pub twins: Vec<Vec<TwinWire>>,
    pub sources: Vec<Vec<SourceWire>>,
}

impl EmaWires {
    /// One channel per LAM chain whose twin follows its block (`LamChain::ema_follows`), from
    /// the stage owning the real block to the stage of the module whose twin it is; a frozen
    /// twin gets none and stays as initialised. `rule` is already resolved for the schedule.
    pub fn new(
        plan: &NetworkPlan,
        placement: &Placement,
        devices: &[Device],
        rule: EmaLagRule,
    ) -> Self {
        let d = placement.num_stages();
        let mut twins: Vec<Vec<TwinWire>> = (0..d).map(|_| Vec::new()).collect();
        let mut sources: Vec<Vec<SourceWire>> = (0..d).map(|_| Vec::new()).collect();
        for c in plan.chains.iter().filter(|c| c.ema_follows) {
            let (tx, rx) = unbounded();
            let block = plan.arch.block_name(c.blocks[0]);
            let prefixes = plan.arch.block_prefixes(c.blocks[0]);
            let ts = placement.stage_of(c.step);
            let ss = placement.stage_of(c.ema_source_module);
            let lag = twin_lag(rule, c.step, c.ema_source_module);
            twins[ts].push(TwinWire {
                module: c.step,
                block: block.clone(),
                prefixes: prefixes.clone(),
                rx,
                lag,
            });
            sources[ss].push(SourceWire {
                module: c.ema_source_module,
                block,
                prefixes,
                tx,
                to: devices[ts],
            });
        }
        EmaWires { twins, sources }
    }
}

/// The lag of the twin in `twin_module` of a block of `source_module` under `rule`.
fn twin_lag(rule: EmaLagRule, twin_module: usize, source_module: usize) -> EmaLag {
    match rule {
        EmaLagRule::Exact => EmaLag::Steps(0),
        EmaLagRule::Distance => EmaLag::Steps((source_module - twin_module) as u64),
        // `Auto` never gets here: `Pipeline::start` resolves it for the schedule.
        EmaLagRule::Latest | EmaLagRule::Auto => EmaLag::Latest,
    }
}

/// The modules `states` (consecutive, in order) on `device`: each built, wired to its EMA
/// twins and sources, restored from its snapshot, laid out for the compute format and joined
/// to its replicas.
pub fn build_stage(
    plan: &NetworkPlan,
    s: &PipelineSettings,
    states: &[ModuleSnapshot],
    device: Device,
    twins: Vec<TwinWire>,
    sources: Vec<SourceWire>,
) -> Result<Stage, TrainError> {
    let mut modules = Vec::with_capacity(states.len());
    for start in states {
        let nets = build_nets(plan, start.module, s.image, device);
        let settings = ModuleSettings {
            lr: s.lr,
            optim: s.optim.clone(),
            routes: ModuleRoutes::of(plan, start.module),
            micro: s.micro,
            recompute_graph: s.recompute,
            ema_momentum: s.ema_momentum,
            may_drop: s.on_nonfinite == OnNonFinite::Skip,
            loss_scale: s.compute.precision == Precision::Fp16,
        };
        modules.push(LocalModule::new(nets, settings));
    }
    let first = states[0].module;
    for TwinWire { module: m, block, prefixes, rx, lag } in twins {
        let module = &mut modules[m - first];
        let params = block_params(&module.nets.ema_vs.variables(), &prefixes);
        let backlog = Default::default();
        module.ema.twins.push(TwinLink { block, params, rx, lag, backlog, device });
    }
    for SourceWire { module: m, block, prefixes, tx, to } in sources {
        let module = &mut modules[m - first];
        let params = block_params(&module.nets.vs.variables(), &prefixes);
        let per_stage_streams = s.per_stage_streams(device);
        module.ema.sources.push(SourceLink { block, params, tx, device: to, per_stage_streams });
    }
    for (module, start) in modules.iter_mut().zip(states) {
        module.restore(start)?;
        if s.compute.memory_format == MemoryFormat::ChannelsLast {
            for (_, t) in module.nets.state() {
                mlaan_accel::set_channels_last(&t)?;
            }
        }
        if let Some(r) = &s.replicas {
            module.join_replicas(r)?;
        }
    }
    let input =
        (first == 0).then(|| InputPrep::new(&s.mean, &s.std, s.compute.memory_format, device));
    Ok(Stage::new(plan, modules, device, input))
}

/// Trainable parameters of the unit under `prefixes` (`layer3.0`; `features.21` and
/// `features.22`) in a store, sorted by name.
fn block_params(vars: &HashMap<String, Tensor>, prefixes: &[String]) -> Vec<Tensor> {
    let prefixes: Vec<String> = prefixes.iter().map(|p| format!("{p}.")).collect();
    let in_unit = |n: &str| prefixes.iter().any(|p| n.starts_with(p));
    let mut v: Vec<(&String, &Tensor)> =
        vars.iter().filter(|(n, _)| in_unit(n) && !n.contains("running_")).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, t)| t.shallow_clone()).collect()
}

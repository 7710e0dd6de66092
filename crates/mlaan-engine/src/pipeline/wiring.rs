//! Building a stage before its thread runs: its modules from their starting state, the EMA
//! channels between real blocks and their twins (possibly on other stages), and the CPU
//! snapshot of a module that a checkpoint is made of.

use super::messages::{ModuleSnapshot, PipelineSettings};
use crate::handoff::Handed;
use crate::init::{build_nets, load_state};
use crate::module::{EmaLag, EmaSnapshot, LocalModule, ModuleSettings, SourceLink, TwinLink};
use crate::stage::Stage;
use crate::TrainError;
use crossbeam_channel::{unbounded, Receiver, Sender};
use mlaan_core::config::{EmaLagRule, MemoryFormat, OnNonFinite, Precision};
use mlaan_core::placement::Placement;
use mlaan_core::plan::NetworkPlan;
use std::collections::HashMap;
use tch::{Device, Tensor};

/// A twin's end of an EMA channel, before its stage has built the twin.
pub struct TwinWire {
    module: usize,
    block: String,
    rx: Receiver<Handed<EmaSnapshot>>,
    lag: EmaLag,
}

/// A real block's end of an EMA channel, and the device of the twin it feeds.
pub struct SourceWire {
    module: usize,
    block: String,
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
            let block = format!("layer{}.{}", c.blocks[0].stage, c.blocks[0].index);
            let ts = placement.stage_of(c.step);
            let ss = placement.stage_of(c.ema_source_module);
            let lag = twin_lag(rule, c.step, c.ema_source_module);
            twins[ts].push(TwinWire { module: c.step, block: block.clone(), rx, lag });
            sources[ss].push(SourceWire {
                module: c.ema_source_module,
                block,
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

/// The modules `states` (consecutive, in order) on `device`, with their optimizer state,
/// EMA links and kept EMA backlog restored.
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
        load_state(&nets, &start.state)?;
        if s.compute.memory_format == MemoryFormat::ChannelsLast {
            for (_, t) in nets.state() {
                mlaan_accel::set_channels_last(&t)?;
            }
        }
        let settings = ModuleSettings {
            accumulate: s.accumulate,
            recompute_graph: s.recompute,
            ema_momentum: s.ema_momentum,
            may_drop: s.on_nonfinite == OnNonFinite::Skip,
            loss_scale: s.compute.precision == Precision::Fp16,
            ..ModuleSettings::for_module(plan, start.module, s.lr, s.optim.clone())
        };
        let mut module = LocalModule::new(nets, settings);
        module.restore_optimizer(&start.momentum, start.step)?;
        module.restore_loss_scale(start.loss_scale)?;
        if let Some(r) = &s.replicas {
            module.join_replicas(r)?;
        }
        modules.push(module);
    }
    let first = states[0].module;
    for TwinWire { module: m, block, rx, lag } in twins {
        let module = &mut modules[m - first];
        let params = block_params(&module.nets.ema_vs.variables(), &block);
        let backlog = states[m - first]
            .ema_backlog
            .iter()
            .filter(|(b, _, _)| *b == block)
            .map(|(_, step, p)| EmaSnapshot {
                step: *step,
                params: p.iter().map(|t| t.to_device(device)).collect(),
            })
            .collect();
        module.ema.twins.push(TwinLink { block, params, rx, lag, backlog, device });
    }
    for SourceWire { module: m, block, tx, to } in sources {
        let module = &mut modules[m - first];
        let params = block_params(&module.nets.vs.variables(), &block);
        let per_stage_streams = s.per_stage_streams(device);
        module.ema.sources.push(SourceLink { block, params, tx, device: to, per_stage_streams });
    }
    Ok(Stage::new(plan, modules, device))
}

/// A CPU copy of module `m`: state, momentum, step and the EMA snapshots not folded yet.
pub fn snapshot(m: &mut LocalModule) -> Result<ModuleSnapshot, TrainError> {
    // Contiguous (NCHW) whatever the training layout: checkpoints hold the standard one.
    let cpu = |t: &Tensor| t.f_to_device_(Device::Cpu, t.kind(), false, true)?.f_contiguous();
    let state = m
        .nets
        .state()
        .iter()
        .map(|(n, t)| Ok((n.clone(), cpu(t)?)))
        .collect::<Result<_, TrainError>>()?;
    let opt = m.optimizer();
    let momentum = opt
        .params
        .iter()
        .zip(&opt.momentum_buffers)
        .filter_map(|((n, _), b)| b.as_ref().map(|b| Ok((n.clone(), cpu(b)?))))
        .collect::<Result<_, TrainError>>()?;
    let ema_backlog = m
        .ema
        .backlog()?
        .into_iter()
        .map(|(block, step, params)| {
            Ok((block, step, params.iter().map(cpu).collect::<Result<Vec<_>, _>>()?))
        })
        .collect::<Result<_, TrainError>>()?;
    let loss_scale = m.loss_scale_saved();
    Ok(ModuleSnapshot { module: m.index, state, momentum, step: m.step, ema_backlog, loss_scale })
}

/// Trainable parameters of block `block` (e.g. `layer3.0`) in a store, sorted by name.
fn block_params(vars: &HashMap<String, Tensor>, block: &str) -> Vec<Tensor> {
    let prefix = format!("{block}.");
    let mut v: Vec<(&String, &Tensor)> =
        vars.iter().filter(|(n, _)| n.starts_with(&prefix) && !n.contains("running_")).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, t)| t.shallow_clone()).collect()
}

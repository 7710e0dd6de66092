//! One evaluation path: the test set through the pipeline, every stage's counts gathered.
//! `train` (at its boundaries) and `mlaan-pipe eval` (a saved backbone on one stage) both use
//! it; the bench measures throughput and evaluates nothing.

use crate::distributed::World;
use crate::session::{pipeline_settings, to_tensors, RunOptions};
use anyhow::{Context, Result};
use mlaan_core::config::RunConfig;
use mlaan_core::placement::Placement;
use mlaan_core::plan::NetworkPlan;
use mlaan_data::{Datasets, Loader, LoaderConfig};
use mlaan_engine::optim::LrSchedule;
use mlaan_engine::pipeline::Pipeline;
use mlaan_engine::wire::ModuleState;
use mlaan_engine::wire::{Forward, ModuleEval, ModuleSnapshot};
use std::sync::Arc;
use tch::Device;

/// Test-set results gathered from the stages.
#[derive(Debug, Default, Clone)]
pub struct EvalResult {
    pub modules: Vec<ModuleEval>,
}

impl EvalResult {
    fn last(&self) -> Option<&ModuleEval> {
        self.modules.iter().max_by_key(|m| m.module)
    }
    pub fn accuracy(&self) -> f64 {
        self.last().map_or(0.0, |m| m.correct as f64 / m.seen.max(1) as f64)
    }
    pub fn loss(&self) -> f64 {
        self.last().map_or(f64::NAN, |m| m.loss_sum / m.seen.max(1) as f64)
    }
    pub fn module_accuracy(&self, k: usize) -> Vec<Option<f64>> {
        (0..k)
            .map(|i| {
                self.modules
                    .iter()
                    .find(|m| m.module == i && m.has_head && m.seen > 0)
                    .map(|m| m.correct as f64 / m.seen as f64)
            })
            .collect()
    }
}

/// Run the test set through the pipeline (after a drain) and gather every stage's counts.
/// With replicas, every rank first takes rank 0's buffers (BatchNorm statistics differ between
/// replicas), evaluates its share of the test set, and the counts are summed: the result is
/// rank 0's model on the whole set, in 1/R of the time.
pub fn evaluate(
    pipe: &mut Pipeline,
    data: &Datasets,
    cfg: &RunConfig,
    world: &World,
) -> Result<EvalResult> {
    let bs = match cfg.train.eval_batch_size {
        0 => cfg.train.batch_size,
        n => n,
    };
    if world.size() > 1 {
        pipe.take_rank0_buffers()?;
    }
    let loader_cfg = LoaderConfig {
        shard_rank: world.rank(),
        shard_count: world.size(),
        ..LoaderConfig::eval(&cfg.data, bs)
    };
    let loader = Loader::new(data.test.clone(), data.eval_transform.clone(), loader_cfg);
    for batch in loader.epoch(0) {
        let batch = batch.context("loading a test batch")?;
        let (x, t) = to_tensors(&batch, false);
        pipe.send(Forward::Eval { x, labels: t.labels })?;
    }
    let mine = pipe.end_eval()?;
    if world.size() == 1 {
        return Ok(EvalResult { modules: mine });
    }
    // A rank whose share is empty reports no modules, so the counts go by module index.
    let counts: Vec<(usize, i64, i64, f64, bool)> =
        mine.iter().map(|e| (e.module, e.correct, e.seen, e.loss_sum, e.has_head)).collect();
    let mut modules: Vec<ModuleEval> = Vec::new();
    for theirs in world.gather("evaluation counts", &counts)? {
        for (module, correct, seen, loss_sum, has_head) in theirs {
            let at = match modules.iter().position(|e| e.module == module) {
                Some(i) => i,
                None => {
                    modules.push(ModuleEval { module, ..Default::default() });
                    modules.len() - 1
                }
            };
            let e = &mut modules[at];
            e.correct += correct;
            e.seen += seen;
            e.loss_sum += loss_sum;
            e.has_head |= has_head;
        }
    }
    Ok(EvalResult { modules })
}

/// The test set through a one-stage pipeline holding `state`, the one module of `plan`: how
/// `mlaan-pipe eval` measures a saved backbone, by the same path (normalisation on the first
/// stage, the stage's evaluation counts, [`evaluate`]) that `train` uses.
pub fn evaluate_module(
    cfg: &RunConfig,
    data: &Datasets,
    plan: NetworkPlan,
    state: ModuleState,
    device: Device,
) -> Result<EvalResult> {
    let lr = LrSchedule::constant(cfg.optim.lr);
    let settings = pipeline_settings(cfg, data, data.info.image(), lr, &RunOptions::default());
    let placement = Placement { groups: std::iter::once(0..plan.k()).collect() };
    let states = vec![ModuleSnapshot::initial(0, state)];
    let mut pipe = Pipeline::start(Arc::new(plan), settings, states, &placement, &[device])?;
    let result = evaluate(&mut pipe, data, cfg, &World::single());
    pipe.finish()?;
    result
}

//! The initial state of every module, made once, on the CPU, from the seed — so that every
//! schedule and every placement starts from the same weights — and loaded into the modules
//! that each stage builds on its own device.
//!
//! LAM copies start as copies of the real blocks they copy, EMA twins as well (docs/method.md §4).

use crate::error::TrainError;
use crate::wire::ModuleState;
use mlaan_core::plan::{ImageSpec, NetworkPlan};
use mlaan_models::module::LocalNets;
use parking_lot::Mutex;
use std::collections::HashMap;
use tch::{Device, Tensor};

/// libtorch's default generator is process-global: initialising networks in two threads at
/// once interleaves their draws. Every initialisation holds this lock, so that a seed gives
/// the same weights whatever else runs.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

/// Build module `m` of `plan` on `device`.
pub fn build_nets(plan: &NetworkPlan, m: usize, image: ImageSpec, device: Device) -> LocalNets {
    let _rng = GLOBAL_RNG.lock();
    LocalNets::new(&plan.arch, &plan.modules[m], image.channels, image.size, image.classes, device)
}

/// Deterministic initial state of every module.
pub fn initial_state(
    plan: &NetworkPlan,
    image: ImageSpec,
    seed: u64,
) -> Result<Vec<ModuleState>, TrainError> {
    let nets: Vec<LocalNets> = {
        let _rng = GLOBAL_RNG.lock();
        tch::manual_seed(seed as i64);
        (0..plan.k())
            .map(|m| {
                LocalNets::new(
                    &plan.arch,
                    &plan.modules[m],
                    image.channels,
                    image.size,
                    image.classes,
                    Device::Cpu,
                )
            })
            .collect()
    };
    let _guard = tch::no_grad_guard();
    // Real blocks by name, wherever they live.
    let mut real: HashMap<String, Tensor> = HashMap::new();
    for n in &nets {
        for (name, t) in n.vs.variables() {
            if !name.starts_with("aux.") {
                real.insert(name, t);
            }
        }
    }
    let mut states = Vec::with_capacity(nets.len());
    for n in &nets {
        let mut state = n.state();
        for term in &n.terms {
            let Some(lam) = &term.lam else { continue };
            let mut map: Vec<(String, String)> = lam.copy_of.clone();
            map.extend(lam.twin_of.iter().map(|real| (format!("ema.{real}"), real.clone())));
            for (name, t) in state.iter_mut() {
                for (copy, src) in &map {
                    if let Some(rest) = name.strip_prefix(&format!("{copy}.")) {
                        let src_name = format!("{src}.{rest}");
                        let v = real.get(&src_name).ok_or_else(|| TrainError::State {
                            module: n.index,
                            message: format!(
                                "LAM copy {name}: real parameter {src_name} not found"
                            ),
                        })?;
                        *t = v.copy();
                    }
                }
            }
        }
        states.push(state.into_iter().map(|(n, t)| (n, t.detach().copy())).collect());
    }
    Ok(states)
}

/// Copy `state` into `nets` by name. Every tensor of the module must be present with the
/// same shape.
pub fn load_state(nets: &LocalNets, state: &[(String, Tensor)]) -> Result<(), TrainError> {
    let _guard = tch::no_grad_guard();
    let given: HashMap<&str, &Tensor> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (name, mut t) in nets.state() {
        let src = given.get(name.as_str()).ok_or_else(|| TrainError::State {
            module: nets.index,
            message: format!("no value for `{name}`"),
        })?;
        if src.size() != t.size() {
            return Err(TrainError::State {
                module: nets.index,
                message: format!(
                    "`{name}` has shape {:?}, the state has {:?}",
                    t.size(),
                    src.size()
                ),
            });
        }
        t.f_copy_(src)?;
    }
    Ok(())
}

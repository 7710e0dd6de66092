//! Gradient bookkeeping of one module: an accumulator per trainable parameter (summed over
//! the micro-batches of an optimizer step), which parameters are the backbone's and which each
//! term's networks', and the one autograd call every pass uses.

use crate::bytes_of;
use crate::error::TrainError;
use mlaan_models::module::LocalNets;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// A parameter's accumulator slot and the parameter itself.
pub type Slotted = Vec<(usize, Tensor)>;

pub struct GradBook {
    acc: Vec<Option<Tensor>>,
    slot: HashMap<String, usize>,
    /// Backbone parameters (`M_i` itself).
    pub backbone: Slotted,
    /// Parameters of each term's networks (heads, LAM chains), by term.
    pub terms: Vec<Slotted>,
}

impl GradBook {
    /// Slots for `params` (every trainable parameter of `nets`, in the optimizer's order).
    pub fn new(nets: &LocalNets, params: &[(String, Tensor)]) -> Self {
        let slot: HashMap<String, usize> =
            params.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        let with_slots = |v: Vec<(String, Tensor)>| -> Slotted {
            v.into_iter().map(|(n, t)| (slot[&n], t)).collect()
        };
        let backbone = with_slots(nets.backbone_params());
        let terms = (0..nets.terms.len()).map(|t| with_slots(nets.term_params(t))).collect();
        GradBook { acc: (0..params.len()).map(|_| None).collect(), slot, backbone, terms }
    }

    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.slot.get(name).copied()
    }

    /// Add `grads`, autograd's answer for the backbone parameters in their order (undefined
    /// ones skipped).
    pub fn add_backbone(
        &mut self,
        grads: impl IntoIterator<Item = Tensor>,
    ) -> Result<(), TrainError> {
        for ((slot, _), g) in self.backbone.iter().zip(grads) {
            if g.defined() {
                add_into(&mut self.acc[*slot], g)?;
            }
        }
        Ok(())
    }

    /// Add gradients already paired with their slots.
    pub fn add_slotted(&mut self, grads: Vec<(usize, Tensor)>) -> Result<(), TrainError> {
        for (slot, g) in grads {
            add_into(&mut self.acc[slot], g)?;
        }
        Ok(())
    }

    /// The accumulators, by slot (what the optimizer steps with).
    pub fn accumulated(&self) -> &[Option<Tensor>] {
        &self.acc
    }

    /// The accumulators, to average across replicas before the step.
    pub fn accumulated_mut(&mut self) -> &mut [Option<Tensor>] {
        &mut self.acc
    }

    pub fn clear(&mut self) {
        self.acc.iter_mut().for_each(|g| *g = None);
    }

    pub fn bytes(&self) -> u64 {
        self.acc.iter().flatten().map(bytes_of).sum()
    }
}

/// Jᵀg: the gradient of `out` against `inputs` in the direction `grad`.
pub fn vjp(
    out: &Tensor,
    grad: &Tensor,
    inputs: &[&Tensor],
    keep_graph: bool,
) -> Result<Vec<Tensor>, TrainError> {
    let s = (out * grad).sum(Kind::Float);
    Ok(Tensor::f_run_backward(&[s], inputs, keep_graph, false)?)
}

/// `acc += g`, or `acc = g` when empty.
pub fn add_into(acc: &mut Option<Tensor>, g: Tensor) -> Result<(), TrainError> {
    match acc {
        Some(a) => {
            let _ = a.f_add_(&g)?;
        }
        None => *acc = Some(g),
    }
    Ok(())
}

//! Evaluation on a stage: every module's backbone in turn, each head's accuracy as a probe of
//! linear separability by depth, and the final classifier's loss. Counts add up over the
//! batches until the coordinator asks for them.

use super::Stage;
use crate::wire::ModuleEval;
use mlaan_models::{losses, Mode};
use tch::Tensor;

impl Stage {
    /// Count one evaluation batch (`x` the stage's input, prepared) and return the stage's
    /// output for the next stage. Call under `no_grad`.
    pub fn evaluate(&mut self, x: &Tensor, labels: &Tensor) -> Tensor {
        if self.eval.is_empty() {
            self.eval = self
                .modules
                .iter()
                .map(|m| ModuleEval { module: m.index, ..Default::default() })
                .collect();
        }
        let n = labels.size()[0];
        let mut h = x.shallow_clone();
        for (m, e) in self.modules.iter().zip(self.eval.iter_mut()) {
            h = m.nets.forward(&h, Mode::Eval);
            if let Some(logits) = m.nets.probe_logits(&h) {
                e.has_head = true;
                e.correct += losses::correct(&logits, labels);
                e.seen += n;
                if m.nets.classifier.is_some() {
                    e.loss_sum +=
                        losses::cross_entropy(&logits, labels).double_value(&[]) * n as f64;
                }
            }
        }
        h
    }

    /// The counts since the last call, by module; counting starts again.
    pub fn take_eval(&mut self) -> Vec<ModuleEval> {
        std::mem::take(&mut self.eval)
    }
}

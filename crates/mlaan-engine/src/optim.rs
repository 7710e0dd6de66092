//! SGD with Nesterov momentum and weight decay, written here so that its state (the momentum
//! buffers) can be saved and restored; tch's optimizers do not expose theirs. Semantics are
//! PyTorch's `torch.optim.SGD` (dampening 0): the first step initialises the buffer with the
//! gradient.

use mlaan_core::config::OptimConfig;
use tch::{TchError, Tensor};

/// One module's optimizer over a fixed, named list of parameters.
#[derive(Debug)]
pub struct Sgd {
    pub params: Vec<(String, Tensor)>,
    /// Momentum buffer per parameter (`None` before its first step).
    pub momentum_buffers: Vec<Option<Tensor>>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
}

impl Sgd {
    pub fn new(params: Vec<(String, Tensor)>, cfg: &OptimConfig) -> Self {
        let n = params.len();
        Sgd {
            params,
            momentum_buffers: (0..n).map(|_| None).collect(),
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
        }
    }

    /// Apply one step with `grads[i]` for `params[i]`; parameters without a gradient are left
    /// alone (as PyTorch skips parameters whose `.grad` is `None`).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        for ((_, p), (g, buf)) in
            self.params.iter().zip(grads.iter().zip(self.momentum_buffers.iter_mut()))
        {
            let Some(g) = g else { continue };
            let mut d = if self.weight_decay != 0.0 {
                g.f_add(&p.f_mul_scalar(self.weight_decay)?)?
            } else {
                g.shallow_clone()
            };
            if self.momentum != 0.0 {
                let b = match buf {
                    Some(b) => {
                        let _ = b.f_mul_scalar_(self.momentum)?;
                        let _ = b.f_add_(&d)?;
                        b.shallow_clone()
                    }
                    None => {
                        let b = d.f_detach_copy()?;
                        *buf = Some(b.shallow_clone());
                        b
                    }
                };
                d = if self.nesterov { d.f_add(&b.f_mul_scalar(self.momentum)?)? } else { b };
            }
            let mut p = p.shallow_clone();
            let _ = p.f_sub_(&d.f_mul_scalar(lr)?)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> u64 {
        self.momentum_buffers.iter().flatten().map(crate::bytes_of).sum()
    }

    /// The momentum buffers by parameter name, as host copies in the standard layout (what a
    /// checkpoint holds); parameters without one yet are left out.
    pub fn save(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        self.params
            .iter()
            .zip(&self.momentum_buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| Ok((n.clone(), to_host(b)?))))
            .collect()
    }

    /// Back from [`Sgd::save`]: each buffer to its parameter by name, on the parameter's
    /// device. A name the optimizer does not have, or a shape that is not its parameter's, is
    /// an error naming it.
    pub fn restore(&mut self, momentum: &[(String, Tensor)]) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        for (name, buf) in momentum {
            let slot = self
                .params
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| format!("momentum for unknown parameter `{name}`"))?;
            let p = &self.params[slot].1;
            if buf.size() != p.size() {
                return Err(format!(
                    "momentum of `{name}` has shape {:?}, the parameter {:?}",
                    buf.size(),
                    p.size()
                ));
            }
            let copy = buf.f_to_device(p.device()).and_then(|b| b.f_detach_copy());
            self.momentum_buffers[slot] = Some(copy.map_err(|e| e.to_string())?);
        }
        Ok(())
    }
}

/// A host copy of `t` in the standard (contiguous) layout, whatever its device and layout.
pub fn to_host(t: &Tensor) -> Result<Tensor, TchError> {
    t.f_to_device_(tch::Device::Cpu, t.kind(), false, true)?.f_contiguous()
}

/// Cosine learning-rate schedule with a linear warm-up, by optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_start: f64,
    pub min: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn new(cfg: &OptimConfig, steps_per_epoch: u64, epochs: usize) -> Self {
        let total_steps = (steps_per_epoch * epochs as u64).max(1);
        let warmup_steps =
            ((cfg.warmup_epochs * steps_per_epoch as f64).round() as u64).min(total_steps);
        LrSchedule {
            peak: cfg.lr,
            warmup_start: cfg.warmup_start_lr,
            min: cfg.min_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The same rate at every step (profiles, benchmarks, tests).
    pub fn constant(lr: f64) -> Self {
        LrSchedule { peak: lr, warmup_start: lr, min: lr, warmup_steps: 0, total_steps: 1 }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            let t = step as f64 / self.warmup_steps as f64;
            return self.warmup_start + (self.peak - self.warmup_start) * t;
        }
        let span = (self.total_steps - self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn matches_pytorch_nesterov_sgd() {
        // Reference values from torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True,
        // weight_decay=0.01) on p=[1,-2], grads [0.5,0.5] then [-1,2], worked by hand:
        // step 1: d = g + wd·p = [0.51, 0.48]; buf = d; d' = d + 0.9·buf = [0.969, 0.912]
        //         p = [1 - 0.0969, -2 - 0.0912] = [0.9031, -2.0912]
        // step 2: d = [-1 + 0.009031, 2 - 0.020912] = [-0.990969, 1.979088]
        //         buf = 0.9·[0.51,0.48] + d = [-0.531969, 2.411088]
        //         d' = d + 0.9·buf = [-1.4697411, 4.1490672]
        //         p = [0.9031 + 0.14697411, -2.0912 - 0.41490672] = [1.05007411, -2.50610672]
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg =
            OptimConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, ..Default::default() };
        let mut opt = Sgd::new(vec![("p".into(), p.shallow_clone())], &cfg);
        opt.step(&[Some(Tensor::from_slice(&[0.5f32, 0.5]))], 0.1).unwrap();
        opt.step(&[Some(Tensor::from_slice(&[-1.0f32, 2.0]))], 0.1).unwrap();
        let got: Vec<f32> = Vec::try_from(p.detach().to_kind(Kind::Float)).unwrap();
        assert!(
            (got[0] - 1.050_074_1).abs() < 1e-6 && (got[1] + 2.506_106_7).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = OptimConfig {
            lr: 1.0,
            warmup_epochs: 1.0,
            warmup_start_lr: 0.1,
            min_lr: 0.0,
            ..Default::default()
        };
        let s = LrSchedule::new(&cfg, 10, 3);
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(5) - 0.55).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(20) - 0.5).abs() < 1e-12);
        assert!(s.at(30).abs() < 1e-12);
    }
}

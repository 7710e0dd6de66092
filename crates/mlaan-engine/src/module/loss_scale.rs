//! The dynamic loss scale of one module under fp16 (`train.precision = "fp16"`).
//!
//! float16 keeps five exponent bits: gradients below 6e-8 flush to zero. Each module scales
//! the losses it back-propagates (its own terms, and the gradient parts later modules send it)
//! by S before every backward pass through its float16 graph and divides the results by S in
//! float32 at once, so everything it keeps, sends and steps with is unscaled. Each module has
//! its own S because each has its own losses: one module's overflow says nothing about
//! another's range. Before a step the module checks its accumulated gradients: any inf/NaN
//! means S was too large for this batch, so the step is skipped (the weights and momentum
//! stay; the step still counts, so EMA publication and the learning-rate schedule keep their
//! positions) and S halves; after `GROWTH_INTERVAL` clean steps S doubles. These are
//! `torch.amp.GradScaler`'s defaults.

use crate::error::TrainError;
use tch::{Kind, Tensor};

const INITIAL: f64 = 65536.0;
const GROWTH_INTERVAL: u32 = 2000;
const MIN: f64 = 1.0;
const MAX: f64 = 16777216.0;

#[derive(Debug, Clone)]
pub struct LossScale {
    scale: f64,
    clean_steps: u32,
    /// Steps skipped for non-finite gradients so far.
    pub skipped: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale { scale: INITIAL, clean_steps: 0, skipped: 0 }
    }
}

impl LossScale {
    pub fn value(&self) -> f64 {
        self.scale
    }

    /// (scale, clean steps, skipped steps), what a checkpoint keeps so that an fp16 run
    /// resumes with the scale it had.
    pub fn saved(&self) -> [f64; 3] {
        [self.scale, f64::from(self.clean_steps), self.skipped as f64]
    }

    /// Back from [`LossScale::saved`]; `None` when the values cannot be one.
    pub fn from_saved(v: [f64; 3]) -> Option<LossScale> {
        let [scale, clean, skipped] = v;
        let whole = |x: f64| x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f64;
        ((MIN..=MAX).contains(&scale) && whole(clean) && skipped >= 0.0).then_some(LossScale {
            scale,
            clean_steps: clean as u32,
            skipped: skipped as u64,
        })
    }

    /// A gradient computed on scaled losses, back in true units and float32.
    pub fn unscale(&self, g: &Tensor) -> Tensor {
        g.to_kind(Kind::Float) / self.scale
    }

    /// Whether every accumulated gradient is finite; updates S, counts a skip. One device
    /// sync for the whole module.
    pub fn check_step(&mut self, grads: &[Option<Tensor>]) -> Result<bool, TrainError> {
        let bad: Vec<Tensor> =
            grads.iter().flatten().map(|g| g.isfinite().logical_not().any()).collect();
        let finite = bad.is_empty()
            || Tensor::f_stack(&bad, 0)?.any().to_kind(Kind::Int64).f_int64_value(&[])? == 0;
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= GROWTH_INTERVAL {
                self.scale = (self.scale * 2.0).min(MAX);
                self.clean_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(MIN);
            self.clean_steps = 0;
            self.skipped += 1;
        }
        Ok(finite)
    }
}

/// `g` times the loss scale, before a backward pass (as it is without one).
pub fn scaled(scaler: &Option<LossScale>, g: &Tensor) -> Tensor {
    match scaler {
        Some(s) => g * s.value(),
        None => g.shallow_clone(),
    }
}

/// A gradient of scaled losses in true units (as it is without a loss scale; undefined stays
/// undefined).
pub fn unscaled(scaler: &Option<LossScale>, g: &Tensor) -> Tensor {
    match scaler {
        Some(s) if g.defined() => s.unscale(g),
        _ => g.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn an_overflow_halves_the_scale_and_counts_a_skip() {
        let mut s = LossScale::default();
        let ok = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let inf = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        let nan = Tensor::from_slice(&[f32::NAN]);
        assert!(s.check_step(&[Some(ok.shallow_clone()), None]).unwrap());
        assert!(!s.check_step(&[Some(ok.shallow_clone()), Some(inf)]).unwrap());
        assert_eq!((s.value(), s.skipped), (INITIAL / 2.0, 1));
        assert!(!s.check_step(&[Some(nan)]).unwrap());
        assert_eq!((s.value(), s.skipped), (INITIAL / 4.0, 2));
        assert!(s.check_step(&[None]).unwrap());
    }

    #[test]
    fn the_saved_state_comes_back() {
        let mut s = LossScale::default();
        s.check_step(&[Some(Tensor::from_slice(&[f32::NAN]))]).unwrap();
        s.check_step(&[None]).unwrap();
        let back = LossScale::from_saved(s.saved()).unwrap();
        assert_eq!((back.value(), back.clean_steps, back.skipped), (INITIAL / 2.0, 1, 1));
        assert!(LossScale::from_saved([0.0, 0.0, 0.0]).is_none());
        assert!(LossScale::from_saved([2.0, 0.5, 0.0]).is_none());
    }

    #[test]
    fn clean_steps_grow_the_scale() {
        let mut s = LossScale::default();
        let ok = Tensor::ones([1], (Kind::Float, Device::Cpu));
        for _ in 0..GROWTH_INTERVAL {
            assert!(s.check_step(&[Some(ok.shallow_clone())]).unwrap());
        }
        assert_eq!(s.value(), INITIAL * 2.0);
    }

    #[test]
    fn unscaling_recovers_a_gradient_too_small_for_float16() {
        let s = LossScale::default();
        let tiny = 1e-9f64;
        let scaled = Tensor::from_slice(&[(tiny * s.value()) as f32]).to_kind(Kind::Half);
        assert_eq!(Tensor::from_slice(&[tiny as f32]).to_kind(Kind::Half).double_value(&[0]), 0.0);
        let back = s.unscale(&scaled).double_value(&[0]);
        assert!((back - tiny).abs() < 1e-3 * tiny, "{back}");
    }
}

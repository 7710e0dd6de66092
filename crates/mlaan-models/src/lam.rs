//! MLAAN's leap augmented module: a chain of trainable copies of later backbone blocks whose
//! first block is summed with an EMA twin of the real block,
//! `z = Aug[0](u) + EMA[0](u)`, then `Aug[1..](z)`.
//!
//! The copies live in the module's own store (trained only by its cascade loss); the twin lives
//! in a separate, frozen store and moves only by `p_ema ← m·p_ema + (1−m)·p_real`.

use crate::backbone::{copy_paths, real_paths, Unit};
use crate::layers::Mode;
use mlaan_core::arch::{ArchSpec, BlockInfo};
use tch::nn;
use tch::Tensor;

#[derive(Debug)]
pub struct Lam {
    copies: Vec<Unit>,
    twin: Unit,
    /// `(name prefix of a copy in the module store, the same part of the real unit)`, e.g.
    /// `("aux.cascade.lam.0", "layer3.0")`, or for a VGG layer
    /// `("aux.cascade.lam.0.0", "features.21")` and `("aux.cascade.lam.0.1", "features.22")`.
    pub copy_of: Vec<(String, String)>,
    /// Names of the real unit the twin follows (also its names in the EMA store).
    pub twin_of: Vec<String>,
}

impl Lam {
    /// Copies of `chain` (units of `arch`) under `p.lam.{j}`, and the twin of its first unit
    /// in the EMA store `ema`.
    pub fn new(p: &nn::Path, ema: &nn::Path, arch: &ArchSpec, chain: &[BlockInfo]) -> Self {
        let mut copies = Vec::with_capacity(chain.len());
        let mut copy_of = Vec::new();
        let dotted = |q: &nn::Path| q.components().collect::<Vec<_>>().join(".");
        for (j, b) in chain.iter().enumerate() {
            let real = arch.block_prefixes(b.at);
            let paths = copy_paths(&(p / "lam" / j), real.len());
            copy_of.extend(paths.iter().map(dotted).zip(real));
            copies.push(Unit::new(arch, &paths, b));
        }
        Lam {
            copies,
            twin: Unit::new(arch, &real_paths(ema, arch, chain[0].at), &chain[0]),
            copy_of,
            twin_of: arch.block_prefixes(chain[0].at),
        }
    }

    pub fn forward(&self, u: &Tensor, mode: Mode) -> Tensor {
        let mut z = self.copies[0].forward(u, mode) + self.twin.forward(u, mode);
        for b in &self.copies[1..] {
            z = b.forward(&z, mode);
        }
        z
    }
}

/// `p_ema ← m·p_ema + (1−m)·p_real` for each `(ema, real)` pair, without gradient. `real` may
/// live on another device.
pub fn ema_update(pairs: &[(Tensor, Tensor)], momentum: f64) -> Result<(), tch::TchError> {
    let _guard = tch::no_grad_guard();
    for (ema, real) in pairs {
        let mut e = ema.shallow_clone();
        let r = real.f_to_device(e.device())?;
        let _ = e.f_mul_scalar_(momentum)?;
        let _ = e.f_add_(&r.f_mul_scalar(1.0 - momentum)?)?;
    }
    Ok(())
}

//! MLAAN's leap augmented module: a chain of trainable copies of later backbone blocks whose
//! first block is summed with an EMA twin of the real block,
//! `z = Aug[0](u) + EMA[0](u)`, then `Aug[1..](z)`.
//!
//! The copies live in the module's own store (trained only by its cascade loss); the twin lives
//! in a separate, frozen store and moves only by `p_ema ← m·p_ema + (1−m)·p_real`.

use crate::layers::Mode;
use crate::resnet::{block_path, Block};
use mlaan_core::arch::{BlockInfo, BlockKind};
use tch::nn;
use tch::Tensor;

#[derive(Debug)]
pub struct Lam {
    copies: Vec<Block>,
    twin: Block,
    /// `(name prefix of the copy in the module store, name of the real block)`, e.g.
    /// `("aux.cascade.lam.0", "layer3.0")`.
    pub copy_of: Vec<(String, String)>,
    /// Name of the real block the twin follows (also its prefix in the EMA store).
    pub twin_of: String,
}

impl Lam {
    pub fn new(p: &nn::Path, ema: &nn::Path, kind: BlockKind, chain: &[BlockInfo]) -> Self {
        let real = |b: &BlockInfo| format!("layer{}.{}", b.at.stage, b.at.index);
        let copies =
            chain.iter().enumerate().map(|(j, b)| Block::new(&(p / "lam" / j), kind, b)).collect();
        let copy_of = chain
            .iter()
            .enumerate()
            .map(|(j, b)| {
                (format!("{}.lam.{j}", p.components().collect::<Vec<_>>().join(".")), real(b))
            })
            .collect();
        Lam {
            copies,
            twin: Block::new(&block_path(ema, &chain[0]), kind, &chain[0]),
            copy_of,
            twin_of: real(&chain[0]),
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

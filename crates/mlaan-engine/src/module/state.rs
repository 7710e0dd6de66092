//! A module's state as one symmetric pair: [`LocalModule::save`] gives the snapshot a
//! checkpoint holds (networks with their EMA twins, momentum, step, EMA snapshots not folded
//! in yet, the fp16 loss scale), and [`LocalModule::restore`] takes one back. Each part is
//! saved and restored by its owner's own pair (`Sgd::save`/`restore`, `LossScale::saved`/
//! `from_saved`, `EmaLinks::save_backlog`/`restore_backlog`).

use super::loss_scale::LossScale;
use super::LocalModule;
use crate::error::TrainError;
use crate::init::load_state;
use crate::optim::to_host;
use crate::wire::ModuleSnapshot;

impl LocalModule {
    /// A host copy of everything this module's training depends on.
    pub fn save(&mut self) -> Result<ModuleSnapshot, TrainError> {
        let state = self
            .nets
            .state()
            .iter()
            .map(|(n, t)| Ok((n.clone(), to_host(t)?)))
            .collect::<Result<_, TrainError>>()?;
        Ok(ModuleSnapshot {
            module: self.index,
            state,
            momentum: self.opt.save()?,
            step: self.step,
            ema_backlog: self.ema.save_backlog()?,
            loss_scale: self.scaler.as_ref().map(LossScale::saved),
        })
    }

    /// Continue from `s`: every tensor of the networks, the momentum buffers, the step count
    /// (which positions the learning-rate schedule), the snapshots the twins had not folded
    /// in, and the fp16 loss scale (when the module scales and `s` has one). Call after the
    /// module's EMA links are wired.
    pub fn restore(&mut self, s: &ModuleSnapshot) -> Result<(), TrainError> {
        let module = self.index;
        let state_error = move |message: String| TrainError::State { module, message };
        load_state(&self.nets, &s.state)?;
        self.opt.restore(&s.momentum).map_err(state_error)?;
        self.step = s.step;
        if let (Some(scaler), Some(v)) = (&mut self.scaler, s.loss_scale) {
            *scaler = LossScale::from_saved(v).ok_or_else(|| {
                state_error(format!("loss scale {v:?} is not a scale, clean-step and skip count"))
            })?;
        }
        self.ema.restore_backlog(&s.ema_backlog)?;
        Ok(())
    }
}

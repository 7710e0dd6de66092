//! Batch-norm rollback: a training forward moves the running statistics, so a batch that is
//! dropped after its forward (a non-finite loss under `on_nonfinite = "skip"`) must put them
//! back. The statistics are copied before each forward while dropping is possible (a few
//! kilobytes per module) and restored when the batch is dropped.

use crate::error::TrainError;
use mlaan_models::module::LocalNets;
use tch::Tensor;

/// A module's running statistics (shared with its networks).
pub struct RunningStats {
    buffers: Vec<Tensor>,
}

impl RunningStats {
    pub fn of(nets: &LocalNets) -> Self {
        let is_stat = |n: &str| n.contains("running_") || n.ends_with("num_batches_tracked");
        RunningStats {
            buffers: nets.state().into_iter().filter(|(n, _)| is_stat(n)).map(|(_, t)| t).collect(),
        }
    }

    /// Their values now.
    pub fn copy(&self) -> Vec<Tensor> {
        self.buffers.iter().map(Tensor::copy).collect()
    }

    /// Put back values taken by [`RunningStats::copy`].
    pub fn restore(&self, saved: &[Tensor]) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        for (b, s) in self.buffers.iter().zip(saved) {
            b.shallow_clone().f_copy_(s)?;
        }
        Ok(())
    }
}

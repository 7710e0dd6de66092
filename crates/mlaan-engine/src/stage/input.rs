//! What the first stage does with the raw images it receives (`u8`, on its device already):
//! to float, normalised by the dataset's mean and standard deviation, in the compute layout.
//! Later stages receive activations and use them as they are.

use crate::error::TrainError;
use mlaan_core::config::MemoryFormat;
use tch::{Device, Kind, Tensor};

/// Stage 0's input preparation.
pub struct InputPrep {
    mean: Tensor,
    std: Tensor,
    layout: MemoryFormat,
}

impl InputPrep {
    /// Per-channel `mean` and `std` in [0, 1] units, on `device`.
    pub fn new(mean: &[f32], std: &[f32], layout: MemoryFormat, device: Device) -> Self {
        let per_channel =
            |v: &[f32]| Tensor::from_slice(v).view([1, v.len() as i64, 1, 1]).to_device(device);
        InputPrep { mean: per_channel(mean), std: per_channel(std), layout }
    }

    /// `(x / 255 − mean) / std`, channels-last when the run computes so.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        let x = (x.to_kind(Kind::Float) / 255.0 - &self.mean) / &self.std;
        Ok(match self.layout {
            MemoryFormat::ChannelsLast => mlaan_accel::to_channels_last(&x)?,
            MemoryFormat::Contiguous => x,
        })
    }
}

//! Drill faults (`--inject-fault KIND@STAGE:BATCH`): a stage errors, panics, sees a NaN or
//! drops its channels at one batch, so that tests and drills see the pipeline fail cleanly.

use super::port::Port;
use crate::error::TrainError;
use tch::Tensor;

/// A fault to inject (tests): at `batch`, stage `stage` does `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub stage: usize,
    pub batch: u64,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Error,
    Panic,
    NaN,
    /// The stage drops its channels and returns as if finished.
    CloseChannel,
}

impl std::str::FromStr for Fault {
    type Err = String;
    /// `KIND@STAGE:BATCH`, e.g. `panic@1:5`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad fault `{s}` (KIND@STAGE:BATCH, KIND = error|panic|nan|close)");
        let (kind, at) = s.split_once('@').ok_or_else(bad)?;
        let (stage, batch) = at.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "error" => FaultKind::Error,
            "panic" => FaultKind::Panic,
            "nan" => FaultKind::NaN,
            "close" => FaultKind::CloseChannel,
            _ => return Err(bad()),
        };
        Ok(Fault {
            stage: stage.parse().map_err(|_| bad())?,
            batch: batch.parse().map_err(|_| bad())?,
            kind,
        })
    }
}

impl Fault {
    /// Apply the fault to stage `stage`'s input of batch `id` when it is due: the input as it
    /// goes on (times NaN for `nan`), or the failure the drill asks for.
    pub fn inject(
        fault: Option<Fault>,
        stage: usize,
        id: u64,
        x: Tensor,
        port: &mut Port,
    ) -> Result<Tensor, TrainError> {
        match fault {
            Some(f) if f.stage == stage && f.batch == id => match f.kind {
                FaultKind::Error => Err(TrainError::Injected(id)),
                FaultKind::Panic => panic!("injected panic at batch {id}"),
                FaultKind::NaN => Ok(x * f64::NAN),
                FaultKind::CloseChannel => {
                    port.close();
                    Err(TrainError::Stopped)
                }
            },
            _ => Ok(x),
        }
    }
}

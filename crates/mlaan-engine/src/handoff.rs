//! Handing tensors from one stage thread to another when each computes on its own CUDA
//! stream (`pipeline.streams = "per-stage"`).
//!
//! A tensor a producer sends may still be being written by kernels queued on the producer's
//! stream. The producer records an [`Event`] there as it sends; the consumer makes its own
//! stream wait for that event before it queues anything on the tensor, and tells the caching
//! allocator that the tensor is now used on its stream too, so that the block is not handed
//! out again (to the producer's stream) while the consumer's kernels may still read it. On
//! CPU, or when every stage shares the default stream, a message travels bare.

use crate::module::{BatchTargets, EmaSnapshot};
use crate::pipeline::Forward;
use crate::stage::BackMsg;
use crate::TrainError;
use mlaan_accel::{record_stream, Event};
use tch::Tensor;

/// A message and, under per-stage streams, the event its tensors are complete at.
pub struct Handed<T> {
    msg: T,
    ready: Option<Event>,
}

/// Messages that carry tensors across threads.
pub trait Carries {
    fn tensors(&self) -> Vec<&Tensor>;
}

impl<T: Carries> Handed<T> {
    /// A message from a thread that needs no ordering (the coordinator's CPU batches, or
    /// every stage on its device's default stream).
    pub fn bare(msg: T) -> Self {
        Handed { msg, ready: None }
    }

    /// Wrap `msg` on the sending thread. With `per_stage_streams`, an event is recorded on
    /// this thread's current stream of the device the message's tensors are on (after a
    /// copy to another GPU that is where the copy was queued).
    pub fn send(msg: T, per_stage_streams: bool) -> Result<Self, TrainError> {
        if !per_stage_streams {
            return Ok(Handed::bare(msg));
        }
        let device = msg.tensors().iter().map(|t| t.device()).find(|d| d.is_cuda());
        let ready = device.map(Event::record).transpose()?;
        Ok(Handed { msg, ready })
    }

    /// The message, safe to use on the receiving thread's current stream.
    pub fn receive(self) -> Result<T, TrainError> {
        if let Some(ready) = &self.ready {
            ready.wait()?;
            for t in self.msg.tensors() {
                record_stream(t)?;
            }
        }
        Ok(self.msg)
    }
}

impl Carries for BatchTargets {
    fn tensors(&self) -> Vec<&Tensor> {
        std::iter::once(&self.labels)
            .chain(self.image_u8.as_ref())
            .filter(|t| t.defined())
            .collect()
    }
}

impl Carries for Forward {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Forward::Train { x, targets, .. } => {
                let mut v = vec![x];
                v.extend(targets.tensors());
                v
            }
            Forward::Eval { x, labels } => vec![x, labels],
            _ => Vec::new(),
        }
    }
}

impl Carries for BackMsg {
    fn tensors(&self) -> Vec<&Tensor> {
        self.parts.iter().map(|p| &p.grad).collect()
    }
}

impl Carries for EmaSnapshot {
    fn tensors(&self) -> Vec<&Tensor> {
        self.params.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::GradPart;
    use tch::{Device, Kind};

    #[test]
    fn on_cpu_a_message_travels_bare() {
        let msg = BackMsg {
            id: 3,
            parts: vec![GradPart {
                reach_left: 1,
                grad: Tensor::ones([2], (Kind::Float, Device::Cpu)),
            }],
            last: true,
        };
        let h = Handed::send(msg, true).unwrap();
        assert!(h.ready.is_none());
        let back = h.receive().unwrap();
        assert_eq!((back.id, back.parts.len()), (3, 1));
    }

    /// A gradient written by a long chain of kernels on one stream, read on another: without
    /// the event the reader could see it half-written; with it every value is exact.
    #[test]
    fn a_handoff_between_stream_threads_sees_complete_tensors() {
        let Some(d) = mlaan_accel::cuda_for_test() else { return };
        let (tx, rx) = crossbeam_channel::bounded::<Handed<EmaSnapshot>>(2);
        let producer = std::thread::spawn(move || {
            mlaan_accel::Stream::from_pool(d).unwrap().make_current().unwrap();
            for step in 0..8u64 {
                let mut t = Tensor::zeros([1 << 22], (Kind::Float, d));
                for _ in 0..50 {
                    t += 1.0;
                }
                let snap = EmaSnapshot { step, params: vec![t] };
                tx.send(Handed::send(snap, true).unwrap()).unwrap();
            }
        });
        mlaan_accel::Stream::from_pool(d).unwrap().make_current().unwrap();
        let mut seen = 0;
        for h in rx {
            let snap = h.receive().unwrap();
            let min = snap.params[0].min().double_value(&[]);
            assert_eq!(min, 50.0, "step {}", snap.step);
            seen += 1;
        }
        producer.join().unwrap();
        assert_eq!(seen, 8);
    }
}

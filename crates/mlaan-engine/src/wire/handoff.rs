//! Handing tensors from one stage thread to another: the one place where a message lands on
//! the receiving stage's device and, when stages compute on their own CUDA streams
//! (`pipeline.streams = "per-stage"`), in order with the producer's work.
//!
//! A tensor a producer sends may still be being written by kernels queued on the producer's
//! stream. The producer records an [`Event`] there as it sends; the consumer makes its own
//! stream wait for that event before it queues anything on the tensor, and tells the caching
//! allocator that the tensor is now used on its stream too, so that the block is not handed
//! out again (to the producer's stream) while the consumer's kernels may still read it. Then
//! every tensor that is not on the consumer's device is moved there — forward inputs, targets,
//! gradient parts and EMA snapshots alike, whatever the sender did — so a stage never computes
//! with a tensor of another device. On CPU, or when every stage shares the default stream, a
//! message travels without an event.

use super::{BackMsg, BatchTargets, EmaSnapshot, Forward};
use crate::error::TrainError;
use mlaan_accel::{record_stream, Event};
use tch::{Device, Tensor};

/// A message and, under per-stage streams, the event its tensors are complete at.
pub struct Handed<T> {
    msg: T,
    ready: Option<Event>,
}

/// Messages that carry tensors across threads: every tensor they hold, so that the hand-off
/// can order and move each one.
pub trait Carries {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor>;
}

impl<T: Carries> Handed<T> {
    /// A message from a thread that needs no ordering (the coordinator's CPU batches, or
    /// every stage on its device's default stream).
    pub fn bare(msg: T) -> Self {
        Handed { msg, ready: None }
    }

    /// Wrap `msg` on the sending thread. With `per_stage_streams`, an event is recorded on
    /// this thread's current stream of the device the message's tensors are on.
    pub fn send(mut msg: T, per_stage_streams: bool) -> Result<Self, TrainError> {
        if !per_stage_streams {
            return Ok(Handed::bare(msg));
        }
        let device = msg
            .tensors_mut()
            .iter()
            .filter(|t| t.defined())
            .map(|t| t.device())
            .find(|d| d.is_cuda());
        let ready = device.map(Event::record).transpose()?;
        Ok(Handed { msg, ready })
    }

    /// The message on the receiving thread, every tensor on `device` and safe to use on this
    /// thread's current stream.
    pub fn receive(self, device: Device) -> Result<T, TrainError> {
        let ordered = self.ready.is_some();
        if let Some(ready) = &self.ready {
            ready.wait()?;
        }
        self.land(|t| {
            if ordered {
                // Before any copy: the copy itself is queued on this thread's stream.
                record_stream(&t)?;
            }
            move_to(t, device)
        })
    }

    /// The message with `f` applied to each of its (defined) tensors.
    fn land(
        self,
        mut f: impl FnMut(Tensor) -> Result<Tensor, TrainError>,
    ) -> Result<T, TrainError> {
        let mut msg = self.msg;
        for t in msg.tensors_mut() {
            if t.defined() {
                *t = f(t.shallow_clone())?;
            }
        }
        Ok(msg)
    }
}

/// `t` on `device`: itself when it is there already. A copy to a GPU does not block the host
/// (from pinned memory it is asynchronous, and it is ordered on the device's stream); a copy to
/// the host does, so the values are there when the host reads them.
fn move_to(t: Tensor, device: Device) -> Result<Tensor, TrainError> {
    if t.device() == device {
        return Ok(t);
    }
    Ok(t.f_to_device_(device, t.kind(), device.is_cuda(), false)?)
}

impl Carries for BatchTargets {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        std::iter::once(&mut self.labels).chain(self.image_u8.as_mut()).collect()
    }
}

impl Carries for Forward {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        match self {
            Forward::Train { x, targets, .. } => {
                let mut v = vec![x];
                v.extend(targets.tensors_mut());
                v
            }
            Forward::Eval { x, labels } => vec![x, labels],
            Forward::Skip { .. }
            | Forward::EvalEnd
            | Forward::TakeRank0Buffers
            | Forward::Drain { .. }
            | Forward::Collect => Vec::new(),
        }
    }
}

impl Carries for BackMsg {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        self.parts.iter_mut().map(|p| &mut p.grad).collect()
    }
}

impl Carries for EmaSnapshot {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        self.params.iter_mut().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::GradPart;
    use tch::Kind;

    fn floats(n: i64) -> Tensor {
        Tensor::ones([n], (Kind::Float, Device::Cpu))
    }

    /// One of every message type that carries tensors, every tensor slot filled.
    fn every_message() -> (Forward, Forward, BackMsg, EmaSnapshot) {
        let targets = BatchTargets { labels: floats(2), image_u8: Some(floats(3)) };
        let train = Forward::Train { id: 1, x: floats(4), targets };
        let eval = Forward::Eval { x: floats(4), labels: floats(2) };
        let part = |reach_left| GradPart { reach_left, grad: floats(5) };
        let back = BackMsg { id: 1, parts: vec![part(0), part(1)], last: true };
        let snap = EmaSnapshot { step: 3, params: vec![floats(6), floats(7)] };
        (train, eval, back, snap)
    }

    /// Every tensor of every message type goes through the one landing step: a stand-in move
    /// (to float64, as a move to another device would change the device) reaches all of them.
    #[test]
    fn the_handoff_lands_every_tensor_of_every_message_type() {
        let to_double = |t: Tensor| Ok(t.to_kind(Kind::Double));
        let (train, eval, back, snap) = every_message();
        let mut landed: Vec<Tensor> = Vec::new();
        let mut keep = |mut m: Box<dyn Carries>| {
            landed.extend(m.tensors_mut().into_iter().map(|t| t.shallow_clone()))
        };
        keep(Box::new(Handed::bare(train).land(to_double).unwrap()));
        keep(Box::new(Handed::bare(eval).land(to_double).unwrap()));
        keep(Box::new(Handed::bare(back).land(to_double).unwrap()));
        keep(Box::new(Handed::bare(snap).land(to_double).unwrap()));
        // 3 + 2 + 2 + 2 tensors in the four messages.
        assert_eq!(landed.len(), 9);
        assert!(landed.iter().all(|t| t.kind() == Kind::Double));
    }

    #[test]
    fn on_cpu_a_message_travels_bare_and_stays() {
        let (_, _, back, _) = every_message();
        let h = Handed::send(back, true).unwrap();
        assert!(h.ready.is_none());
        let back = h.receive(Device::Cpu).unwrap();
        assert_eq!((back.id, back.parts.len()), (1, 2));
        assert!(back.parts.iter().all(|p| p.grad.device() == Device::Cpu));
    }

    /// On a GPU machine: whatever device the sender left a message's tensors on, they arrive
    /// on the receiver's (host to GPU, GPU to host, and GPU to GPU with two GPUs).
    #[test]
    fn cuda_messages_land_on_the_receiving_device() {
        let Some(d) = mlaan_accel::cuda_for_test() else { return };
        let mut routes = vec![(Device::Cpu, d), (d, Device::Cpu)];
        if tch::Cuda::device_count() > 1 {
            routes.push((Device::Cuda(0), Device::Cuda(1)));
            routes.push((Device::Cuda(1), Device::Cuda(0)));
        }
        for (from, to) in routes {
            let (mut train, mut eval, mut back, mut snap) = every_message();
            let sent: [&mut dyn Carries; 4] = [&mut train, &mut eval, &mut back, &mut snap];
            for m in sent {
                for t in m.tensors_mut() {
                    *t = t.to_device(from);
                }
            }
            let mut landed: Vec<Tensor> = Vec::new();
            let mut take = |mut m: Box<dyn Carries>| {
                landed.extend(m.tensors_mut().into_iter().map(|t| t.shallow_clone()))
            };
            take(Box::new(Handed::send(train, true).unwrap().receive(to).unwrap()));
            take(Box::new(Handed::send(eval, true).unwrap().receive(to).unwrap()));
            take(Box::new(Handed::send(back, true).unwrap().receive(to).unwrap()));
            take(Box::new(Handed::send(snap, true).unwrap().receive(to).unwrap()));
            assert_eq!(landed.len(), 9);
            for t in &landed {
                assert_eq!(t.device(), to, "{from:?} -> {to:?}");
                assert_eq!(t.sum(Kind::Double).double_value(&[]), t.numel() as f64);
            }
        }
    }

    /// A gradient written by a long chain of kernels on one stream, read on another: without
    /// the event the reader could see it half-written; with it every value is exact.
    #[test]
    fn cuda_handoff_between_stream_threads_sees_complete_tensors() {
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
            let snap = h.receive(d).unwrap();
            let min = snap.params[0].min().double_value(&[]);
            assert_eq!(min, 50.0, "step {}", snap.step);
            seen += 1;
        }
        producer.join().unwrap();
        assert_eq!(seen, 8);
    }
}

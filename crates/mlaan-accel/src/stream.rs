//! CUDA streams and events, and the process-wide cuDNN/TF32 switches.
//!
//! libtorch's current stream is per thread, so a stage thread that makes a pool stream current
//! queues all its kernels there and stages sharing a GPU overlap. A tensor handed from one
//! stage to another is then ordered by an [`Event`] recorded on the producer's stream and
//! waited on by the consumer's, and [`record_stream`] tells the caching allocator the consumer
//! uses it, so its block is not handed out again while the consumer's kernels may still read
//! it (what `Tensor.record_stream` does in PyTorch).

use crate::{call, cuda_index, ffi, status, AccelError};
use std::ffi::c_void;
use std::ptr::NonNull;
use tch::{Device, Tensor};

/// A CUDA stream (a `c10::Stream`: a device and a stream id).
#[derive(Debug)]
pub struct Stream {
    ptr: NonNull<c_void>,
    device: Device,
}

// SAFETY: a c10::Stream is a plain (device, id) value; CUDA streams may be used from any thread.
unsafe impl Send for Stream {}

impl Stream {
    /// A stream from libtorch's pool on `device` (pool streams are reused round-robin; they
    /// are never destroyed, so handing one back is free).
    pub fn from_pool(device: Device) -> Result<Stream, AccelError> {
        let index = cuda_index("stream", device)?;
        // SAFETY: returns a new heap c10::Stream or null with `err` set.
        let ptr =
            call("stream", |err| unsafe { ffi::ma_stream_from_pool(index, err) }, |p| p.is_null())?;
        Ok(Stream { ptr: NonNull::new(ptr).expect("checked non-null"), device })
    }

    /// The calling thread's current stream on `device`.
    pub fn current(device: Device) -> Result<Stream, AccelError> {
        let index = cuda_index("stream", device)?;
        // SAFETY: as in `from_pool`.
        let ptr =
            call("stream", |err| unsafe { ffi::ma_stream_current(index, err) }, |p| p.is_null())?;
        Ok(Stream { ptr: NonNull::new(ptr).expect("checked non-null"), device })
    }

    /// Make this the calling thread's current stream on its device: every kernel the thread
    /// queues there from now on goes to it.
    pub fn make_current(&self) -> Result<(), AccelError> {
        // SAFETY: `ptr` is a live c10::Stream.
        status("stream", |err| unsafe { ffi::ma_stream_make_current(self.ptr.as_ptr(), err) })
    }

    /// libtorch's id of the stream (0 is the default stream).
    pub fn id(&self) -> i64 {
        // SAFETY: `ptr` is a live c10::Stream.
        unsafe { ffi::ma_stream_id(self.ptr.as_ptr()) }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Wait on the host until everything queued on the stream is done.
    pub fn synchronize(&self) -> Result<(), AccelError> {
        // SAFETY: `ptr` is a live c10::Stream.
        status("stream", |err| unsafe { ffi::ma_stream_synchronize(self.ptr.as_ptr(), err) })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the bridge and is freed once.
        unsafe { ffi::ma_stream_free(self.ptr.as_ptr()) }
    }
}

/// A point in one stream's work that another stream can wait for.
#[derive(Debug)]
pub struct Event {
    ptr: NonNull<c_void>,
    device: Device,
}

// SAFETY: a CUDA event may be waited on from any thread; the c10::Event is only read there.
unsafe impl Send for Event {}

impl Event {
    /// Record an event on the calling thread's current stream of `device`.
    pub fn record(device: Device) -> Result<Event, AccelError> {
        let index = cuda_index("event", device)?;
        // SAFETY: returns a new heap c10::Event or null with `err` set.
        let ptr =
            call("event", |err| unsafe { ffi::ma_event_record(index, err) }, |p| p.is_null())?;
        Ok(Event { ptr: NonNull::new(ptr).expect("checked non-null"), device })
    }

    /// Whether the work queued before the event is done (without waiting).
    pub fn query(&self) -> Result<bool, AccelError> {
        // SAFETY: `ptr` is a live c10::Event.
        let rc = call(
            "event",
            |err| unsafe { ffi::ma_event_query(self.ptr.as_ptr(), err) },
            |r| *r < 0,
        )?;
        Ok(rc == 1)
    }

    /// Make the calling thread's current stream wait (on the device, not the host) for the
    /// work queued before the event.
    pub fn wait(&self) -> Result<(), AccelError> {
        let index = cuda_index("event", self.device)?;
        // SAFETY: `ptr` is a live c10::Event.
        status("event", |err| unsafe { ffi::ma_event_block(self.ptr.as_ptr(), index, err) })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the bridge and is freed once.
        unsafe { ffi::ma_event_free(self.ptr.as_ptr()) }
    }
}

/// The calling thread's current stream on CUDA device `device` as the runtime's raw handle
/// (`cudaStream_t`; null for the legacy default stream), for a library that queues its own
/// kernels (NCCL) in order with this thread's.
pub fn current_stream_handle(device: Device) -> Result<*mut c_void, AccelError> {
    let index = cuda_index("stream", device)?;
    let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: returns the handle (possibly null for the legacy stream) and sets `err` on failure.
    let h = unsafe { ffi::ma_stream_native(index, &mut err) };
    if !err.is_null() {
        return Err(AccelError { what: "stream", message: ffi::take_error(err) });
    }
    Ok(h)
}

/// Make `device` the calling thread's current CUDA device (`cudaSetDevice`): what a library
/// that builds its own CUDA objects for "the current device" (an NCCL communicator) reads.
pub fn set_current_device(device: Device) -> Result<(), AccelError> {
    let index = cuda_index("device", device)?;
    // SAFETY: a plain call with a valid out-pointer.
    status("device", |err| unsafe { ffi::ma_cuda_set_device(index, err) })
}

/// Tell the caching allocator that `tensor` is used on the calling thread's current stream
/// (a no-op for CPU tensors).
pub fn record_stream(tensor: &Tensor) -> Result<(), AccelError> {
    if tensor.device() == Device::Cpu {
        return Ok(());
    }
    // SAFETY: reads the storage pointer of a live tensor.
    status("record stream", |err| unsafe { ffi::ma_record_stream(tensor.as_ptr() as *mut _, err) })
}

/// Turn the cuDNN autotuner and TF32 (in cuBLAS matrix products and cuDNN convolutions) on or
/// off for the process.
pub fn set_cuda_math(cudnn_benchmark: bool, tf32: bool) -> Result<(), AccelError> {
    // SAFETY: sets two global flags.
    status("cuda math", |err| unsafe {
        ffi::ma_set_cuda_math(cudnn_benchmark as i32, tf32 as i32, err)
    })
}

/// The process's `(cudnn_benchmark, tf32)` switches as libtorch has them now.
pub fn cuda_math() -> (bool, bool) {
    let (mut bench, mut tf32) = (0, 0);
    // SAFETY: writes two ints.
    unsafe { ffi::ma_cuda_math(&mut bench, &mut tf32) };
    (bench != 0, tf32 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn streams_and_events_need_a_cuda_device() {
        assert!(Stream::from_pool(Device::Cpu).unwrap_err().to_string().contains("not a CUDA"));
        assert!(Event::record(Device::Cpu).is_err());
        record_stream(&Tensor::ones([2], (Kind::Float, Device::Cpu))).unwrap();
    }

    #[test]
    fn the_math_switches_round_trip() {
        let before = cuda_math();
        set_cuda_math(true, false).unwrap();
        assert_eq!(cuda_math(), (true, false));
        set_cuda_math(before.0, before.1).unwrap();
    }

    #[test]
    fn cuda_pool_stream_becomes_the_threads_current_stream() {
        let Some(d) = crate::cuda_for_test() else { return };
        std::thread::spawn(move || {
            assert_eq!(Stream::current(d).unwrap().id(), 0, "a new thread starts on the default");
            let s = Stream::from_pool(d).unwrap();
            assert_ne!(s.id(), 0);
            s.make_current().unwrap();
            assert_eq!(Stream::current(d).unwrap().id(), s.id());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cuda_event_orders_a_handoff_between_two_stream_threads() {
        let Some(d) = crate::cuda_for_test() else { return };
        let a = Tensor::randn([2048, 2048], (Kind::Float, d));
        let expected = a.matmul(&a).matmul(&a).sum(Kind::Double).double_value(&[]);
        let (tx, rx) = std::sync::mpsc::channel::<(Tensor, Event)>();
        let producer = {
            let a = a.shallow_clone();
            std::thread::spawn(move || {
                Stream::from_pool(d).unwrap().make_current().unwrap();
                for _ in 0..4 {
                    let y = a.matmul(&a);
                    tx.send((y, Event::record(d).unwrap())).unwrap();
                }
            })
        };
        let consumer = std::thread::spawn(move || {
            Stream::from_pool(d).unwrap().make_current().unwrap();
            let mut sums = Vec::new();
            for (y, ready) in rx {
                ready.wait().unwrap();
                record_stream(&y).unwrap();
                let z = y.matmul(&a).sum(Kind::Double);
                drop(y);
                sums.push(z.double_value(&[]));
            }
            sums
        });
        producer.join().unwrap();
        let sums = consumer.join().unwrap();
        assert_eq!(sums.len(), 4);
        for s in sums {
            assert!((s - expected).abs() <= 1e-3 * expected.abs().max(1.0), "{s} vs {expected}");
        }
    }
}

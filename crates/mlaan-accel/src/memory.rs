//! The caching allocator's own figures, per CUDA device: what `torch.cuda.memory_allocated`,
//! `max_memory_allocated`, `memory_reserved` and `max_memory_reserved` report, and what the
//! local-learning papers quote as a method's GPU memory.

use crate::{cuda_index, ffi, status, AccelError};
use tch::Device;

/// Bytes held by tensors (allocated) and by the allocator's cache (reserved), now and at the
/// peak since the last [`reset_cuda_peak`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocatorMemory {
    pub allocated: u64,
    pub peak_allocated: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
}

/// The allocator's figures for a CUDA device; an error for any other device.
pub fn cuda_memory(device: Device) -> Result<AllocatorMemory, AccelError> {
    let index = cuda_index("allocator statistics", device)?;
    let mut out = [0i64; 4];
    // SAFETY: `out` has the four slots the bridge writes.
    status("allocator statistics", |err| unsafe {
        ffi::ma_cuda_memory(index, out.as_mut_ptr(), err)
    })?;
    let b = |v: i64| v.max(0) as u64;
    Ok(AllocatorMemory {
        allocated: b(out[0]),
        peak_allocated: b(out[1]),
        reserved: b(out[2]),
        peak_reserved: b(out[3]),
    })
}

/// Hand the caching allocator's unused blocks back to the driver (as
/// `torch.cuda.empty_cache`), so that a following peak window starts from what is allocated.
pub fn empty_cuda_cache() -> Result<(), AccelError> {
    // SAFETY: a plain call with a valid out-pointer.
    status("allocator cache", |err| unsafe { ffi::ma_cuda_empty_cache(err) })
}

/// Start a new peak window on a CUDA device (as `torch.cuda.reset_peak_memory_stats`); CUDA is
/// initialised first if nothing has used it yet.
pub fn reset_cuda_peak(device: Device) -> Result<(), AccelError> {
    let index = cuda_index("allocator statistics", device)?;
    // SAFETY: a plain call with a valid out-pointer.
    status("allocator statistics", |err| unsafe { ffi::ma_cuda_reset_peak(index, err) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_device_has_no_allocator_figures() {
        let err = cuda_memory(Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("not a CUDA device"), "{err}");
    }

    #[test]
    fn cuda_peak_covers_a_freed_tensor() {
        let Some(d) = crate::cuda_for_test() else { return };
        // Before any tensor exists on the device: the allocator is initialised first.
        reset_cuda_peak(d).unwrap();
        let before = cuda_memory(d).unwrap();
        {
            let _t = tch::Tensor::zeros([64 << 20], (tch::Kind::Uint8, d));
        }
        let after = cuda_memory(d).unwrap();
        assert!(after.peak_allocated >= before.allocated + (64 << 20));
        assert!(after.peak_reserved >= after.peak_allocated);
    }

    #[test]
    fn cuda_emptied_cache_reserves_only_what_is_allocated() {
        let Some(d) = crate::cuda_for_test() else { return };
        let keep = tch::Tensor::zeros([1 << 20], (tch::Kind::Uint8, d));
        drop(tch::Tensor::zeros([256 << 20], (tch::Kind::Uint8, d)));
        assert!(cuda_memory(d).unwrap().reserved >= 256 << 20);
        empty_cuda_cache().unwrap();
        reset_cuda_peak(d).unwrap();
        let m = cuda_memory(d).unwrap();
        assert!(m.reserved < 256 << 20 && m.peak_reserved == m.reserved, "{m:?}");
        drop(keep);
    }
}

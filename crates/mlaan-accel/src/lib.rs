//! What tch does not expose of libtorch's compute settings, through a small C++ bridge
//! (`cpp/accel_bridge.cpp`):
//!
//! - [`autocast`]: mixed precision on the calling thread (libtorch's autocast state is per
//!   thread, so each stage thread sets its own);
//! - [`layout`]: channels-last tensors and parameters;
//! - [`stream`]: CUDA streams from libtorch's pool, events between them, and telling the
//!   caching allocator about cross-stream use; the cuDNN autotuner and TF32 switches;
//! - [`memory`]: the caching allocator's current and peak bytes per device, what
//!   `torch.cuda.max_memory_allocated` reports and the papers quote.
//!
//! The bridge uses only device-generic c10 interfaces, so it builds on a CPU-only machine; the
//! CUDA functions fail with a clear error there and callers check [`cuda_available`] first.

pub mod autocast;
mod ffi;
pub mod layout;
pub mod memory;
pub mod stream;

pub use autocast::{set_autocast, without_autocast};
pub use layout::{is_channels_last, set_channels_last, to_channels_last};
pub use memory::{cuda_memory, reset_cuda_peak, AllocatorMemory};
pub use stream::{cuda_math, record_stream, set_cuda_math, Event, Stream};

/// A call into libtorch failed; the message is libtorch's own.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct AccelError {
    pub what: &'static str,
    pub message: String,
}

static CUDA_BACKEND: std::sync::Once = std::sync::Once::new();

/// Load `libtorch_cuda.so` so that libtorch registers its CUDA backend. rustc links with
/// `--as-needed`, which drops the library because no symbol of it is referenced; without it
/// `tch::Cuda::is_available()` is false even on a GPU machine. On a CPU-only install the
/// library's dependencies are missing and loading fails harmlessly.
pub fn load_cuda_backend() {
    CUDA_BACKEND.call_once(|| {
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally kept.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            tracing::debug!("libtorch_cuda.so not loaded: CUDA devices unavailable");
        }
    });
}

/// Whether CUDA devices can be used here (after loading libtorch's CUDA backend).
pub fn cuda_available() -> bool {
    load_cuda_backend();
    tch::Cuda::is_available()
}

/// CUDA device 0 for a test that needs a GPU, or `None` after printing that the test is
/// skipped (the convention of every CUDA-only test here: it passes, and says so).
pub fn cuda_for_test() -> Option<tch::Device> {
    if cuda_available() {
        Some(tch::Device::Cuda(0))
    } else {
        eprintln!("skipped: no CUDA device");
        None
    }
}

/// Run a bridge call that reports failure through `err` and a sentinel result.
fn call<T>(
    what: &'static str,
    f: impl FnOnce(*mut *mut std::ffi::c_char) -> T,
    failed: impl Fn(&T) -> bool,
) -> Result<T, AccelError> {
    let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
    let out = f(&mut err);
    if failed(&out) || !err.is_null() {
        return Err(AccelError { what, message: ffi::take_error(err) });
    }
    Ok(out)
}

/// A bridge status code: 0 is success.
fn status(
    what: &'static str,
    f: impl FnOnce(*mut *mut std::ffi::c_char) -> i32,
) -> Result<(), AccelError> {
    call(what, f, |rc| *rc != 0).map(|_| ())
}

/// The bridge's number for a device type: 0 CPU, 1 CUDA.
fn device_kind(device: tch::Device) -> i32 {
    match device {
        tch::Device::Cuda(_) => 1,
        _ => 0,
    }
}

/// The CUDA index of `device`, or an error naming what needed one.
fn cuda_index(what: &'static str, device: tch::Device) -> Result<i32, AccelError> {
    match device {
        tch::Device::Cuda(i) => Ok(i as i32),
        other => Err(AccelError { what, message: format!("{other:?} is not a CUDA device") }),
    }
}

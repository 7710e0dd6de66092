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
pub mod libs;
pub mod memory;
pub mod stream;

pub use autocast::{set_autocast, without_autocast};
pub use layout::{is_channels_last, set_channels_last, to_channels_last};
pub use libs::{libtorch_dir, libtorch_version, loaded_library};
pub use memory::{cuda_memory, empty_cuda_cache, reset_cuda_peak, AllocatorMemory};
pub use stream::{
    cuda_math, current_stream_handle, record_stream, set_cuda_math, set_current_device, Event,
    Stream,
};

/// A call into libtorch failed; the message is libtorch's own.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct AccelError {
    pub what: &'static str,
    pub message: String,
}

/// Whether libtorch's CUDA backend is loaded, and if not, why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaBackend {
    Loaded,
    /// `dlopen("libtorch_cuda.so")` failed; the loader's own message, which names the library
    /// that is missing (on the slim CPU install: cuDNN, cuBLAS, NCCL, ...).
    NotLoaded(String),
}

static CUDA_BACKEND: std::sync::OnceLock<CudaBackend> = std::sync::OnceLock::new();

/// Load `libtorch_cuda.so` so that libtorch registers its CUDA backend, once, and say how it
/// went. rustc links with `--as-needed`, which drops the library because no symbol of it is
/// referenced; without it `tch::Cuda::is_available()` is false even on a GPU machine. On a
/// CPU-only install the library's dependencies are missing and loading fails harmlessly: the
/// answer keeps the loader's message for `doctor` and for every "no CUDA device" error.
pub fn load_cuda_backend() -> &'static CudaBackend {
    CUDA_BACKEND.get_or_init(|| {
        let name = c"libtorch_cuda.so";
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally kept.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns the last error of this thread as a C string, or null.
            let err = unsafe { libc::dlerror() };
            let msg = if err.is_null() {
                "dlopen failed without a message".to_string()
            } else {
                unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
            };
            tracing::debug!("libtorch_cuda.so not loaded: {msg}");
            CudaBackend::NotLoaded(msg)
        } else {
            CudaBackend::Loaded
        }
    })
}

/// Whether CUDA devices can be used here (after loading libtorch's CUDA backend).
pub fn cuda_available() -> bool {
    load_cuda_backend();
    tch::Cuda::is_available()
}

/// The environment switch that turns every CUDA-only test's skip into a failure: a GPU check
/// sets it, so that a machine where the backend does not load cannot pass by skipping.
pub const REQUIRE_CUDA_ENV: &str = "MLAAN_REQUIRE_CUDA";

/// Whether [`REQUIRE_CUDA_ENV`] is set to something other than empty or `0`.
pub fn cuda_required() -> bool {
    std::env::var(REQUIRE_CUDA_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// CUDA device 0 for a test that needs a GPU, or `None` after printing that the test is
/// skipped (the convention of every CUDA-only test here). Under `MLAAN_REQUIRE_CUDA=1` a
/// missing GPU panics instead, with the reason, so the test fails.
pub fn cuda_for_test() -> Option<tch::Device> {
    cuda_devices_for_test(1).map(|d| d[0])
}

/// The first `n` CUDA devices for a test, or `None` after printing why the test is skipped.
/// A machine without CUDA fails the test under `MLAAN_REQUIRE_CUDA=1`; one with CUDA but
/// fewer than `n` GPUs skips it (the switch asks for CUDA, not for a number of GPUs).
pub fn cuda_devices_for_test(n: usize) -> Option<Vec<tch::Device>> {
    if !cuda_available() {
        let why = match load_cuda_backend() {
            CudaBackend::NotLoaded(msg) => format!("libtorch's CUDA backend did not load: {msg}"),
            CudaBackend::Loaded => "libtorch's CUDA backend is loaded but sees no device".into(),
        };
        if cuda_required() {
            panic!("{REQUIRE_CUDA_ENV} is set but there is no CUDA device: {why}");
        }
        eprintln!("skipped: no CUDA device ({why})");
        return None;
    }
    let count = tch::Cuda::device_count() as usize;
    if count < n {
        eprintln!("skipped: needs {n} CUDA devices, {count} visible");
        return None;
    }
    Some((0..n).map(tch::Device::Cuda).collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Run one CUDA-only test of this binary in a child process with the switch on or off.
    fn run_cuda_test(strict: bool) -> (bool, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "memory::tests::cuda_peak_covers_a_freed_tensor", "--nocapture"])
            .env(REQUIRE_CUDA_ENV, if strict { "1" } else { "0" })
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    #[test]
    fn the_strict_switch_turns_a_skip_into_a_failure() {
        let (passed, text) = run_cuda_test(false);
        assert!(passed, "{text}");
        let (strict_passed, strict_text) = run_cuda_test(true);
        if cuda_available() {
            assert!(strict_passed && !text.contains("skipped"), "{strict_text}");
        } else {
            // The test passes by skipping, and says why; under the switch it fails, saying why.
            assert!(text.contains("skipped: no CUDA device (libtorch's CUDA backend"), "{text}");
            assert!(!strict_passed, "{strict_text}");
            assert!(strict_text.contains("MLAAN_REQUIRE_CUDA is set"), "{strict_text}");
        }
    }

    #[test]
    fn the_backend_says_why_it_did_not_load() {
        match load_cuda_backend() {
            CudaBackend::Loaded => assert!(tch::Cuda::is_available() || !cuda_available()),
            // The loader's message names a library (the slim CPU install lacks CUDA's).
            CudaBackend::NotLoaded(msg) => assert!(msg.contains(".so"), "{msg}"),
        }
    }
}

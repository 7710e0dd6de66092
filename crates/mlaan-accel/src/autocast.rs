//! Mixed precision on the calling thread. Autocast runs each op in the dtype libtorch's policy
//! gives it (convolutions and matrix products in the compute dtype, reductions and losses in
//! float32) while parameters, their gradients and optimizer state stay float32.

use crate::{device_kind, ffi, status, AccelError};
use std::cell::Cell;
use tch::{Device, Kind};

thread_local! {
    /// The bridge's code of the dtype this thread last turned autocast on with, so that
    /// [`without_autocast`] can turn it back on as it was.
    static DTYPE_CODE: Cell<i32> = const { Cell::new(0) };
}

/// Turn autocast on this thread on for `device`'s type in `dtype` (`BFloat16` or `Half`), or
/// off with `None`. The cast cache stays off (see the bridge).
pub fn set_autocast(device: Device, dtype: Option<Kind>) -> Result<(), AccelError> {
    let (enabled, code) = match dtype {
        None | Some(Kind::Float) => (0, 0),
        Some(Kind::BFloat16) => (1, 1),
        Some(Kind::Half) => (1, 2),
        Some(other) => {
            return Err(AccelError {
                what: "autocast",
                message: format!("{other:?} is not a compute dtype (bfloat16 or float16)"),
            })
        }
    };
    let kind = device_kind(device);
    // SAFETY: flips this thread's autocast flags; `err` is a valid out-pointer.
    status("autocast", |err| unsafe { ffi::ma_autocast_set(kind, enabled, code, err) })?;
    DTYPE_CODE.with(|c| c.set(code));
    Ok(())
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    unsafe { ffi::ma_autocast_enabled(device_kind(device)) != 0 }
}

/// Run `f` with autocast off for `device`'s type, then put it back: for ops autocast must
/// not touch (CUDA autocast refuses `binary_cross_entropy`; the caller computes it in
/// float32 itself).
pub fn without_autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    if !autocast_enabled(device) {
        return f();
    }
    let kind = device_kind(device);
    // SAFETY: plain thread-local flag flips; the dtype setting is left untouched.
    unsafe { ffi::ma_autocast_set(kind, 0, 0, std::ptr::null_mut()) };
    let out = f();
    let code = DTYPE_CODE.with(Cell::get);
    unsafe { ffi::ma_autocast_set(kind, 1, code, std::ptr::null_mut()) };
    out
}

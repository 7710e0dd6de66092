//! The C functions of `cpp/accel_bridge.cpp`. Every one that can fail takes `err`, which it
//! sets to a `malloc`'d message on failure; [`take_error`] turns that into a `String`.

use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    pub fn ma_free(p: *mut c_void);
    pub fn ma_autocast_set(
        kind: c_int,
        enabled: c_int,
        dtype: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn ma_autocast_enabled(kind: c_int) -> c_int;
    pub fn ma_channels_last(tensor: *mut c_void, err: *mut *mut c_char) -> *mut c_void;
    pub fn ma_set_data_channels_last(tensor: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn ma_is_channels_last(tensor: *mut c_void) -> c_int;
    pub fn ma_set_cuda_math(cudnn_benchmark: c_int, tf32: c_int, err: *mut *mut c_char) -> c_int;
    pub fn ma_cuda_math(cudnn_benchmark: *mut c_int, tf32: *mut c_int) -> c_int;
    pub fn ma_stream_from_pool(index: c_int, err: *mut *mut c_char) -> *mut c_void;
    pub fn ma_stream_current(index: c_int, err: *mut *mut c_char) -> *mut c_void;
    pub fn ma_stream_make_current(stream: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn ma_stream_id(stream: *mut c_void) -> i64;
    pub fn ma_stream_synchronize(stream: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn ma_stream_free(stream: *mut c_void);
    pub fn ma_event_record(index: c_int, err: *mut *mut c_char) -> *mut c_void;
    pub fn ma_event_block(event: *mut c_void, index: c_int, err: *mut *mut c_char) -> c_int;
    pub fn ma_event_free(event: *mut c_void);
    pub fn ma_event_query(event: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn ma_stream_native(index: c_int, err: *mut *mut c_char) -> *mut c_void;
    pub fn ma_cuda_set_device(index: c_int, err: *mut *mut c_char) -> c_int;
    pub fn ma_record_stream(tensor: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn ma_cuda_memory(index: c_int, out4: *mut i64, err: *mut *mut c_char) -> c_int;
    pub fn ma_cuda_reset_peak(index: c_int, err: *mut *mut c_char) -> c_int;
    pub fn ma_cuda_empty_cache(err: *mut *mut c_char) -> c_int;
}

/// The message the bridge left in `err` (and frees it), or a fallback when it left none.
pub fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "failed without a message".to_string();
    }
    // SAFETY: the bridge sets `err` to a NUL-terminated string from malloc, or leaves it null.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { ma_free(err.cast()) };
    msg
}

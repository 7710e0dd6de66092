//! The C functions of `cpp/c10d_bridge.cpp`. Every one that can fail takes `err`, which it sets
//! to a `malloc`'d message on failure; [`take_error`] turns that into a `String`.

use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    pub fn md_free(p: *mut c_void);
    pub fn md_store_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub fn md_store_port(store: *mut c_void) -> c_int;
    pub fn md_store_free(store: *mut c_void);
    pub fn md_store_clone(store: *mut c_void, err: *mut *mut c_char) -> *mut c_void;
    pub fn md_store_set(
        store: *mut c_void,
        key: *const c_char,
        data: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn md_store_get(
        store: *mut c_void,
        key: *const c_char,
        timeout_ms: i64,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> *mut u8;
    pub fn md_store_check(store: *mut c_void, key: *const c_char, err: *mut *mut c_char) -> c_int;
    pub fn md_store_add(
        store: *mut c_void,
        key: *const c_char,
        delta: i64,
        err: *mut *mut c_char,
    ) -> i64;
    #[allow(clippy::too_many_arguments)]
    pub fn md_group_new(
        store: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        address: *const c_char,
        is_interface: c_int,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub fn md_group_free(group: *mut c_void);
    pub fn md_group_all_reduce_sum(
        group: *mut c_void,
        tensor: *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn md_group_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn md_group_all_gather(
        group: *mut c_void,
        input: *mut c_void,
        output: *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn md_group_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
}

/// The message the bridge left in `err` (and frees it), or a fallback when it left none.
pub fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "failed without a message".to_string();
    }
    // SAFETY: the bridge sets `err` to a NUL-terminated string from malloc, or leaves it null.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { md_free(err.cast()) };
    msg
}

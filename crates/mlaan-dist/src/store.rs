//! c10d's TCPStore: a key-value server on rank 0 that every rank connects to.

use crate::ffi::{self, take_error};
use crate::{DistError, Result};
use std::ffi::{c_void, CString};
use std::ptr::{self, NonNull};
use std::time::Duration;

/// A connection to the rendezvous store (and, on the rank that serves it, the server).
pub struct Store {
    ptr: NonNull<c_void>,
    addr: String,
    timeout: Duration,
}

// SAFETY: c10d's TCPStore client serialises its operations with its own mutex, and the
// handle is only freed in Drop.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Serve the store on `host:port` (port 0: a free one, see [`Store::port`]) and connect
    /// to it. A port already in use is an error naming it.
    pub fn serve(host: &str, port: u16, timeout: Duration) -> Result<Store> {
        Store::open(host, port, true, timeout)
    }

    /// Connect to the store served on `host:port`, retrying until `timeout`.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Store> {
        Store::open(host, port, false, timeout)
    }

    fn open(host: &str, port: u16, serve: bool, timeout: Duration) -> Result<Store> {
        let addr = format!("{host}:{port}");
        let op = if serve { "serve" } else { "connect" };
        let c_host = cstring(host, &addr, op)?;
        let mut err = ptr::null_mut();
        // SAFETY: valid C string; the bridge catches every exception.
        let raw = unsafe {
            ffi::md_store_new(c_host.as_ptr(), port, serve as i32, millis(timeout), &mut err)
        };
        let ptr = NonNull::new(raw).ok_or_else(|| DistError::Store {
            addr: addr.clone(),
            op: op.into(),
            message: take_error(err),
        })?;
        let mut store = Store { ptr, addr, timeout };
        if serve && port == 0 {
            store.addr = format!("{host}:{}", store.port());
        }
        Ok(store)
    }

    /// A connection of its own to the same server, for a thread that must not wait behind
    /// another thread's blocking `get`.
    pub fn connection(&self) -> Result<Store> {
        let mut err = ptr::null_mut();
        // SAFETY: a live handle; the bridge catches every exception.
        let raw = unsafe { ffi::md_store_clone(self.ptr.as_ptr(), &mut err) };
        let ptr = NonNull::new(raw).ok_or_else(|| DistError::Store {
            addr: self.addr.clone(),
            op: "connect".into(),
            message: take_error(err),
        })?;
        Ok(Store { ptr, addr: self.addr.clone(), timeout: self.timeout })
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        // SAFETY: a live handle.
        let p = unsafe { ffi::md_store_port(self.ptr.as_ptr()) };
        u16::try_from(p).unwrap_or(0)
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The timeout operations on this store wait for.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstring(key, &self.addr, "set")?;
        let mut err = ptr::null_mut();
        // SAFETY: live handle, valid key, `value` readable for its length.
        let rc = unsafe {
            ffi::md_store_set(self.ptr.as_ptr(), k.as_ptr(), value.as_ptr(), value.len(), &mut err)
        };
        if rc != 0 {
            return Err(self.error("set", key, take_error(err)));
        }
        Ok(())
    }

    /// The value of `key`, waiting up to `timeout` for some rank to set it.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let k = cstring(key, &self.addr, "get")?;
        let (mut err, mut len) = (ptr::null_mut(), 0usize);
        // SAFETY: live handle and key; the returned buffer is malloc'd with `len` bytes.
        let raw = unsafe {
            ffi::md_store_get(self.ptr.as_ptr(), k.as_ptr(), millis(timeout), &mut len, &mut err)
        };
        if raw.is_null() {
            return Err(self.error("get", key, take_error(err)));
        }
        let value = unsafe { std::slice::from_raw_parts(raw, len) }.to_vec();
        unsafe { ffi::md_free(raw.cast()) };
        Ok(value)
    }

    /// Whether `key` is set now (no waiting).
    pub fn contains(&self, key: &str) -> Result<bool> {
        let k = cstring(key, &self.addr, "check")?;
        let mut err = ptr::null_mut();
        // SAFETY: live handle and key.
        let rc = unsafe { ffi::md_store_check(self.ptr.as_ptr(), k.as_ptr(), &mut err) };
        if rc < 0 {
            return Err(self.error("check", key, take_error(err)));
        }
        Ok(rc == 1)
    }

    /// Atomically add `delta` to the counter `key` (0 when unset); the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstring(key, &self.addr, "add")?;
        let mut err = ptr::null_mut();
        // SAFETY: live handle and key.
        let v = unsafe { ffi::md_store_add(self.ptr.as_ptr(), k.as_ptr(), delta, &mut err) };
        if v == i64::MIN {
            return Err(self.error("add", key, take_error(err)));
        }
        Ok(v)
    }

    pub(crate) fn raw(&self) -> *mut c_void {
        self.ptr.as_ptr()
    }

    fn error(&self, op: &str, key: &str, message: String) -> DistError {
        DistError::Store { addr: self.addr.clone(), op: format!("{op} '{key}'"), message }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by md_store_new, freed once.
        unsafe { ffi::md_store_free(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.addr)
    }
}

fn cstring(s: &str, addr: &str, op: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Store {
        addr: addr.into(),
        op: op.into(),
        message: format!("'{s}' contains a NUL byte"),
    })
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

//! One NCCL communicator: the replica group of one module whose stages are on GPUs. It reduces
//! on the CUDA stream the calling stage thread computes on (queued after the gradients it
//! reduces and before the copy back, with no host synchronisation), and it is non-blocking, so
//! that a dead or hung peer never leaves a thread waiting in a kernel: a watchdog thread
//! aborts the communicator when NCCL reports an error, when a peer's heartbeat stops while an
//! all-reduce is outstanding, or when one has not finished within the group's timeout; the
//! next call on the communicator (and anything that waits on the aborted stream) then fails
//! with that reason.

use super::id::{self, ID_BYTES};
use crate::liveness::{Watch, PERIOD};
use crate::{DistError, Store};
use cudarc::nccl::sys;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// How often the watchdog looks, and a non-blocking call is polled.
const WATCH: Duration = Duration::from_millis(100);

/// What the calling thread and the watchdog share.
struct Shared {
    /// The `ncclComm_t`, as an address: NCCL allows `ncclCommAbort` from another thread.
    comm: usize,
    /// Why the communicator was aborted (then it must not be used, finalized or destroyed).
    aborted: Mutex<Option<String>>,
    /// The newest all-reduce queued and not yet seen done, and since when one has been.
    pending: Mutex<Option<(mlaan_accel::Event, Instant)>>,
    stop: AtomicBool,
}

impl Shared {
    fn comm(&self) -> sys::ncclComm_t {
        self.comm as sys::ncclComm_t
    }

    /// Abort once, keeping the first reason.
    fn abort(&self, reason: String) {
        let mut aborted = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
        if aborted.is_none() {
            *aborted = Some(reason);
            // SAFETY: a live communicator; NCCL stops its operations on the device.
            unsafe { sys::ncclCommAbort(self.comm()) };
        }
    }

    fn aborted(&self) -> Option<String> {
        self.aborted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// NCCL's asynchronous error, `None` while it has none.
    fn async_error(&self) -> Option<String> {
        let mut r = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(self.comm(), &mut r) };
        match r {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => None,
            err => Some(describe(err, self.comm())),
        }
    }
}

/// An NCCL communicator of one group (see the module doc).
pub struct Communicator {
    shared: Arc<Shared>,
    group: String,
    rank: usize,
    world: usize,
    device: Device,
    timeout: Duration,
    watchdog: Option<JoinHandle<()>>,
}

// SAFETY: the communicator is used by one thread at a time (`Send`, not `Sync`); NCCL
// communicators may move between threads.
unsafe impl Send for Communicator {}

impl Communicator {
    /// Join group `group` as `rank` of `world` on `device` (made the thread's current CUDA
    /// device): rank 0's unique id comes through `store`; returns once every rank has joined,
    /// or fails after `timeout`, which also bounds every later all-reduce.
    pub fn new(
        store: &Store,
        group: &str,
        rank: usize,
        world: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Communicator, DistError> {
        let fail = |message: String| DistError::Collective {
            op: "NCCL join",
            group: group.into(),
            rank,
            world,
            message,
        };
        super::load()?;
        if !device.is_cuda() {
            return Err(fail(format!("NCCL reduces GPU memory; this module is on {device:?}")));
        }
        mlaan_accel::set_current_device(device).map_err(|e| fail(e.to_string()))?;
        let id = id::exchange(store, group, rank, || {
            let mut raw = sys::ncclUniqueId { internal: [0; ID_BYTES] };
            // SAFETY: writes the 128-byte id.
            let rc = unsafe { sys::ncclGetUniqueId(&mut raw) };
            match rc {
                sys::ncclResult_t::ncclSuccess => Ok(raw.internal.map(|c| c as u8)),
                err => {
                    Err(fail(format!("ncclGetUniqueId: {}", describe(err, std::ptr::null_mut()))))
                }
            }
        })?;
        let mut config = non_blocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let raw_id = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
        // SAFETY: valid out-pointers; the id is the group's.
        let rc = unsafe {
            sys::ncclCommInitRankConfig(&mut comm, world as i32, raw_id, rank as i32, &mut config)
        };
        if !matches!(rc, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            return Err(fail(format!("ncclCommInitRankConfig: {}", describe(rc, comm))));
        }
        let shared = Arc::new(Shared {
            comm: comm as usize,
            aborted: Mutex::new(None),
            pending: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        if let Err(why) = settle(&shared, Instant::now() + timeout) {
            shared.abort(why.clone());
            return Err(fail(format!("the communicator did not form: {why}")));
        }
        let watch = Watch::new(store, world)?;
        let watchdog = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("nccl-{group}"))
                .spawn(move || watchdog(shared, watch, timeout))
                .map_err(|e| fail(format!("cannot start its watchdog: {e}")))?
        };
        Ok(Communicator {
            shared,
            group: group.into(),
            rank,
            world,
            device,
            timeout,
            watchdog: Some(watchdog),
        })
    }

    pub fn name(&self) -> &str {
        &self.group
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Why the watchdog aborted the communicator, if it has.
    pub fn aborted(&self) -> Option<String> {
        self.shared.aborted()
    }

    /// Sum `t` over the group, in place, queued on the calling thread's current stream of the
    /// communicator's device: it runs after what the thread queued before and before what it
    /// queues next. `t` must be a contiguous tensor on that device.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        let fail = |message: String| DistError::Collective {
            op: "NCCL all-reduce",
            group: self.group.clone(),
            rank: self.rank,
            world: self.world,
            message,
        };
        if let Some(why) = self.aborted() {
            return Err(fail(format!("the communicator was aborted: {why}")));
        }
        if t.device() != self.device || !t.is_contiguous() {
            return Err(DistError::BadTensor {
                op: "NCCL all-reduce",
                group: self.group.clone(),
                message: format!(
                    "needs a contiguous tensor on {:?}; got one on {:?}{}",
                    self.device,
                    t.device(),
                    if t.is_contiguous() { "" } else { ", not contiguous" }
                ),
            });
        }
        let dtype = nccl_type(t.kind()).ok_or_else(|| DistError::BadTensor {
            op: "NCCL all-reduce",
            group: self.group.clone(),
            message: format!("no NCCL type for {:?}", t.kind()),
        })?;
        let stream =
            mlaan_accel::current_stream_handle(self.device).map_err(|e| fail(e.to_string()))?;
        let ptr = t.data_ptr();
        // SAFETY: in place on `numel` elements of `t`'s storage, which the caller keeps alive
        // until the stream has run (the caching allocator reuses it only in stream order).
        let rc = unsafe {
            sys::ncclAllReduce(
                ptr,
                ptr,
                t.numel(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.shared.comm(),
                stream as sys::cudaStream_t,
            )
        };
        if !matches!(rc, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            return Err(fail(describe(rc, self.shared.comm())));
        }
        settle(&self.shared, Instant::now() + self.timeout).map_err(fail)?;
        // Done once this event is: what the watchdog waits for.
        let done = mlaan_accel::Event::record(self.device).map_err(|e| fail(e.to_string()))?;
        let mut pending = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        let since = match pending.take() {
            Some((older, since)) if !older.query().unwrap_or(true) => since,
            _ => Instant::now(),
        };
        *pending = Some((done, since));
        Ok(())
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        if self.shared.aborted().is_some() {
            return;
        }
        // Flush what is queued, then free; a flush that does not end in time is aborted.
        // SAFETY: a live communicator, not aborted.
        unsafe { sys::ncclCommFinalize(self.shared.comm()) };
        match settle(&self.shared, Instant::now() + self.timeout) {
            // SAFETY: finalized; destroy frees it.
            Ok(()) => unsafe {
                sys::ncclCommDestroy(self.shared.comm());
            },
            Err(why) => self.shared.abort(why),
        }
    }
}

/// Wait until the communicator has no operation in progress (non-blocking calls return before
/// they are done), at most until `deadline`; an error NCCL reports, or the deadline, is the
/// reason.
fn settle(shared: &Shared, deadline: Instant) -> Result<(), String> {
    loop {
        if let Some(why) = shared.aborted() {
            return Err(why);
        }
        let mut r = sys::ncclResult_t::ncclInProgress;
        // SAFETY: a live communicator and a valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(shared.comm(), &mut r) };
        match r {
            sys::ncclResult_t::ncclSuccess => return Ok(()),
            sys::ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            sys::ncclResult_t::ncclInProgress => {
                return Err("no answer from the peers within the timeout".into())
            }
            err => return Err(describe(err, shared.comm())),
        }
    }
}

/// The watchdog of one communicator (see the module doc).
fn watchdog(shared: Arc<Shared>, mut watch: Watch, timeout: Duration) {
    let mut beats_read = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) && shared.aborted().is_none() {
        std::thread::sleep(WATCH);
        if let Some(why) = shared.async_error() {
            shared.abort(format!("NCCL reported {why}"));
            break;
        }
        let outstanding = {
            let mut pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.as_ref() {
                Some((done, _)) if done.query().unwrap_or(false) => {
                    *pending = None;
                    None
                }
                Some((_, since)) => Some(since.elapsed()),
                None => None,
            }
        };
        let Some(waiting) = outstanding else { continue };
        if waiting > timeout {
            shared.abort(format!(
                "an all-reduce has not finished after {:.0} s (distributed.timeout_s)",
                timeout.as_secs_f64()
            ));
            break;
        }
        if beats_read.elapsed() >= PERIOD {
            beats_read = Instant::now();
            match watch.silent_for(PERIOD * 4) {
                Ok(silent) if !silent.is_empty() => {
                    shared.abort(format!(
                        "rank(s) {silent:?} stopped beating while an all-reduce waited for them"
                    ));
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    shared.abort(format!("the store went away while an all-reduce waited: {e}"));
                    break;
                }
            }
        }
    }
}

/// A configuration for a non-blocking communicator, every other field NCCL's default
/// (`NCCL_CONFIG_INITIALIZER` is a C macro: its values, written out).
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22809,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

/// NCCL's type for a tensor kind, `None` where it has none.
pub fn nccl_type(kind: tch::Kind) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t::*;
    use tch::Kind;
    Some(match kind {
        Kind::Float => ncclFloat32,
        Kind::Half => ncclFloat16,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Double => ncclFloat64,
        Kind::Int => ncclInt32,
        Kind::Int64 => ncclInt64,
        Kind::Uint8 => ncclUint8,
        Kind::Int8 => ncclInt8,
        _ => return None,
    })
}

/// NCCL's words for a result, and the communicator's last error when it has one.
fn describe(r: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null())
            .then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    // SAFETY: NCCL returns static strings (or null).
    let what = text(unsafe { sys::ncclGetErrorString(r) }).unwrap_or_else(|| format!("{r:?}"));
    // SAFETY: a null communicator asks for the thread's last error, which NCCL allows.
    let last = text(unsafe { sys::ncclGetLastError(comm) }).filter(|s| !s.is_empty());
    match last {
        Some(l) => format!("{what} ({l})"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_nccl_2_28s_layout() {
        let c = non_blocking_config();
        assert_eq!((c.size, c.magic, c.blocking), (80, 0xcafe_beef, 0));
    }

    #[test]
    fn tensor_kinds_map_to_nccl_types() {
        use sys::ncclDataType_t::*;
        assert_eq!(nccl_type(tch::Kind::Float), Some(ncclFloat32));
        assert_eq!(nccl_type(tch::Kind::BFloat16), Some(ncclBfloat16));
        assert_eq!(nccl_type(tch::Kind::ComplexFloat), None);
    }
}

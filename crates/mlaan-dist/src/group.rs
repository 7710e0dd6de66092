//! c10d's ProcessGroupGloo: collectives on tensors among the ranks that created a group of the
//! same name.

use crate::ffi::{self, take_error};
use crate::store::{millis, Store};
use crate::{DistError, Result};
use std::ffi::{c_void, CString};
use std::ptr::{self, NonNull};
use std::time::Duration;
use tch::Tensor;

/// Where a group's sockets bind: an address of this host, or a network interface (what
/// `GLOO_SOCKET_IFNAME` names for PyTorch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Address(String),
    Interface(String),
}

/// A Gloo process group: `world` ranks, this one `rank`, under `name` in the store.
pub struct Group {
    ptr: NonNull<c_void>,
    name: String,
    rank: usize,
    world: usize,
}

// SAFETY: a group is used by one thread at a time (it is `Send`, not `Sync`); c10d's
// ProcessGroupGloo may be handed between threads.
unsafe impl Send for Group {}

impl Group {
    /// Join the group `name`; returns once every rank has joined (or fails after `timeout`,
    /// which also bounds every later collective).
    pub fn new(
        store: &Store,
        name: &str,
        rank: usize,
        world: usize,
        bind: &Bind,
        timeout: Duration,
    ) -> Result<Group> {
        let fail = |message: String| DistError::Collective {
            op: "join",
            group: name.into(),
            rank,
            world,
            message,
        };
        if world == 0 || rank >= world {
            return Err(fail(format!("rank {rank} is not below the world size {world}")));
        }
        let (addr, iface) = match bind {
            Bind::Address(a) => (a, 0),
            Bind::Interface(i) => (i, 1),
        };
        let prefix = CString::new(format!("group/{name}/")).map_err(|e| fail(e.to_string()))?;
        let c_addr = CString::new(addr.as_str()).map_err(|e| fail(e.to_string()))?;
        let mut err = ptr::null_mut();
        // SAFETY: live store, valid strings; the bridge catches every exception.
        let raw = unsafe {
            ffi::md_group_new(
                store.raw(),
                prefix.as_ptr(),
                rank as i32,
                world as i32,
                c_addr.as_ptr(),
                iface,
                millis(timeout),
                &mut err,
            )
        };
        let ptr = NonNull::new(raw).ok_or_else(|| fail(take_error(err)))?;
        Ok(Group { ptr, name: name.into(), rank, world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `t` = Σ over ranks of `t`, in place (`t` contiguous).
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.contiguous("all-reduce", t)?;
        let mut err = ptr::null_mut();
        // SAFETY: live group; `t` points to an at::Tensor that outlives the call.
        let rc = unsafe {
            ffi::md_group_all_reduce_sum(self.ptr.as_ptr(), t.as_mut_ptr().cast(), &mut err)
        };
        self.check("all-reduce", rc, err)
    }

    /// `t` = rank `root`'s `t`, in place (`t` contiguous, the same shape on every rank).
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.contiguous("broadcast", t)?;
        let mut err = ptr::null_mut();
        // SAFETY: as above.
        let rc = unsafe {
            ffi::md_group_broadcast(self.ptr.as_ptr(), t.as_mut_ptr().cast(), root as i32, &mut err)
        };
        self.check("broadcast", rc, err)
    }

    /// Every rank's `t` (the same shape everywhere), stacked by rank: `[world, ...t.size()]`.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let mut input = t.contiguous();
        let mut shape = vec![self.world as i64];
        shape.extend(t.size());
        let mut out = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
        let mut err = ptr::null_mut();
        // SAFETY: as above; `out` is contiguous with `world` rows of `input`'s shape.
        let rc = unsafe {
            ffi::md_group_all_gather(
                self.ptr.as_ptr(),
                input.as_mut_ptr().cast(),
                out.as_mut_ptr().cast(),
                &mut err,
            )
        };
        self.check("all-gather", rc, err)?;
        Ok(out)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        let mut err = ptr::null_mut();
        // SAFETY: live group.
        let rc = unsafe { ffi::md_group_barrier(self.ptr.as_ptr(), &mut err) };
        self.check("barrier", rc, err)
    }

    fn contiguous(&self, op: &'static str, t: &Tensor) -> Result<()> {
        if t.defined() && t.is_contiguous() {
            return Ok(());
        }
        Err(DistError::BadTensor {
            op,
            group: self.name.clone(),
            message: "the tensor must be defined and contiguous".into(),
        })
    }

    fn check(&self, op: &'static str, rc: i32, err: *mut std::ffi::c_char) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        Err(DistError::Collective {
            op,
            group: self.name.clone(),
            rank: self.rank,
            world: self.world,
            message: take_error(err),
        })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by md_group_new, freed once.
        unsafe { ffi::md_group_free(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group({}, rank {} of {})", self.name, self.rank, self.world)
    }
}

//! Data parallelism for one module: the same module in every replica of the pipeline forms a
//! group (through `mlaan-dist`), and before each optimizer step its gradients — backbone,
//! auxiliary heads and LAM copies alike, everything its optimizer trains — are averaged over
//! the group, flattened into buckets of at most `bucket_bytes` ([`super::buckets`]: a few
//! calls per step, not one per tensor). At start every replica takes rank 0's state.
//!
//! Two libraries reduce: c10d's Gloo, in host memory (a CUDA bucket is copied to the host and
//! back), and NCCL for a module on a GPU when the ranks chose it (`distributed.backend`), on
//! the device and on the stage's own stream, with no host synchronisation. Every group also
//! has a Gloo group for what is small or rare: which gradients exist (host flags), and the
//! broadcasts of rank 0's state.
//!
//! One group per module, not per stage: a stage thread steps its modules in an order that
//! depends on when messages arrive, and collectives on one group must come in the same order
//! on every rank; a module's steps always do.
//!
//! A parameter that got no gradient on some rank (a dropped batch, a term with no loss yet)
//! counts as zero there; one that got none on any rank stays without one, so the optimizer
//! skips it exactly as in one process. The sum is divided by the world size, as DDP does,
//! which makes R replicas of batch B equal one process of batch R·B in R micro-batches.
//! BatchNorm running statistics are not averaged: they stay per replica, as under DDP.

use super::buckets;
use crate::error::TrainError;
use mlaan_dist::nccl::Communicator;
use mlaan_dist::{liveness, Bind, DistError, Group, Reducer, Store};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

/// How the modules of this process meet their replicas: shared by every stage.
#[derive(Clone)]
pub struct Replicas {
    pub store: Arc<Store>,
    pub rank: usize,
    pub world: usize,
    /// Where this process's Gloo sockets bind.
    pub bind: Bind,
    /// How long a collective waits for a peer before failing.
    pub timeout: Duration,
    /// Largest flattened bucket of one all-reduce.
    pub bucket_bytes: usize,
    /// The library that reduces each module's gradients, by module (chosen by the ranks
    /// together, so that a group's ranks agree).
    pub reducers: Vec<Reducer>,
}

/// What a module's gradient averaging has cost so far (cumulative; windows take differences).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    /// Bytes this rank sent into all-reduces (its buffer sizes, as DDP counts them).
    pub bytes: u64,
    /// Time inside averaging: flattening, the all-reduces and copying back.
    pub time: std::time::Duration,
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic { bytes: self.bytes + o.bytes, time: self.time + o.time }
    }
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, o: Traffic) -> Traffic {
        Traffic { bytes: self.bytes - o.bytes, time: self.time.saturating_sub(o.time) }
    }
}

/// One module's group.
pub struct ReplicaSync {
    module: usize,
    /// Gloo: presence flags, broadcasts, and the buckets unless NCCL reduces them.
    group: Group,
    /// NCCL, when it reduces this module's buckets.
    nccl: Option<Communicator>,
    store: Arc<Store>,
    bucket_bytes: usize,
    traffic: Traffic,
}

impl ReplicaSync {
    /// Join module `module`'s group (every rank must, before any step), on `device`, the
    /// module's stage device (NCCL's communicator is made for it).
    pub fn join(r: &Replicas, module: usize, device: Device) -> Result<ReplicaSync, TrainError> {
        let name = format!("module{module}");
        let fail = |cause| replica_error(&r.store, r.world, module, cause);
        let group =
            Group::new(&r.store, &name, r.rank, r.world, &r.bind, r.timeout).map_err(fail)?;
        let nccl = match r.reducers.get(module) {
            Some(Reducer::Nccl) => Some(
                Communicator::new(&r.store, &name, r.rank, r.world, device, r.timeout)
                    .map_err(fail)?,
            ),
            _ => None,
        };
        Ok(ReplicaSync {
            module,
            group,
            nccl,
            store: r.store.clone(),
            bucket_bytes: r.bucket_bytes.max(1),
            traffic: Traffic::default(),
        })
    }

    /// The library that reduces this module's buckets.
    pub fn reducer(&self) -> Reducer {
        if self.nccl.is_some() {
            Reducer::Nccl
        } else {
            Reducer::Gloo
        }
    }

    /// Why the group failed underneath the module (an NCCL communicator its watchdog
    /// aborted: a dead or hung peer), naming the peers; `None` while it has not.
    pub fn failure(&self) -> Option<TrainError> {
        let why = self.nccl.as_ref()?.aborted()?;
        Some(self.error(DistError::Collective {
            op: "NCCL all-reduce",
            group: self.group.name().into(),
            rank: self.group.rank(),
            world: self.group.world(),
            message: format!("aborted: {why}"),
        }))
    }

    /// Make this replica's module rank 0's: every state tensor (parameters, buffers, EMA
    /// twins) and the momentum buffers. Ranks must agree on which momentum buffers exist
    /// (all fresh, or all resumed from the same checkpoint).
    pub fn take_rank0_state(
        &mut self,
        state: &[(String, Tensor)],
        momentum: &[Option<Tensor>],
    ) -> Result<(), TrainError> {
        let present = self.agree_on_presence(momentum)?;
        if present.iter().any(|&n| n != 0 && n != self.group.world()) {
            return Err(TrainError::State {
                module: self.module,
                message: "ranks hold different optimizer state (resumed from different \
                          checkpoints?)"
                    .into(),
            });
        }
        let mut tensors: Vec<Tensor> = state.iter().map(|(_, t)| t.shallow_clone()).collect();
        tensors.extend(momentum.iter().flatten().map(Tensor::shallow_clone));
        self.broadcast_from_rank0(&tensors)
    }

    /// Overwrite `tensors` with rank 0's, in place (every rank passes the same list).
    pub fn broadcast_from_rank0(&mut self, tensors: &[Tensor]) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        self.coalesced(tensors, |group, flat| through_host(group, flat, |h| group.broadcast(h, 0)))
    }

    /// Average `grads` (by optimizer slot; `params` gives each slot's shape) over the group.
    pub fn average(
        &mut self,
        grads: &mut [Option<Tensor>],
        params: &[(String, Tensor)],
    ) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let start = std::time::Instant::now();
        let present = self.agree_on_presence(grads)?;
        let mut tensors = Vec::new();
        for ((g, (_, p)), n) in grads.iter_mut().zip(params).zip(present) {
            if n == 0 {
                continue;
            }
            if g.is_none() {
                *g = Some(p.f_zeros_like()?);
            }
            tensors.extend(g.as_ref().map(Tensor::shallow_clone));
        }
        let world = self.group.world() as f64;
        let mut bytes = (grads.len() * 4) as u64; // the presence flags
        let nccl = self.nccl.as_ref();
        self.coalesced(&tensors, |group, flat| {
            bytes += (flat.numel() * flat.kind().elt_size_in_bytes()) as u64;
            match nccl {
                Some(comm) if flat.device().is_cuda() => comm.all_reduce_sum(flat)?,
                _ => through_host(group, flat, |h| group.all_reduce_sum(h))?,
            }
            let _ = flat.f_div_scalar_(world).map_err(|e| DistError::BadTensor {
                op: "average",
                group: group.name().into(),
                message: e.to_string(),
            })?;
            Ok(())
        })?;
        self.traffic = self.traffic + Traffic { bytes, time: start.elapsed() };
        Ok(())
    }

    /// Gradient averaging's cost since the group formed.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    fn error(&self, cause: DistError) -> TrainError {
        replica_error(&self.store, self.group.world(), self.module, cause)
    }

    /// How many ranks hold each entry of `slots` (one small all-reduce).
    fn agree_on_presence(&self, slots: &[Option<Tensor>]) -> Result<Vec<usize>, TrainError> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let flags: Vec<f32> = slots.iter().map(|g| g.is_some() as u8 as f32).collect();
        let mut t = Tensor::from_slice(&flags);
        self.group.all_reduce_sum(&mut t).map_err(|e| self.error(e))?;
        let counts: Vec<f32> = Vec::try_from(&t)?;
        Ok(counts.into_iter().map(|c| c.round() as usize).collect())
    }

    /// Run `op` on the flat buckets of `tensors` ([`buckets::plan`]), copying the result back.
    /// `op` gets the bucket on its device; a CUDA bucket goes to Gloo through host memory, to
    /// NCCL as it is (`op` decides which), and the copy back is queued after it.
    fn coalesced(
        &self,
        tensors: &[Tensor],
        mut op: impl FnMut(&Group, &mut Tensor) -> Result<(), DistError>,
    ) -> Result<(), TrainError> {
        for range in buckets::plan(tensors, self.bucket_bytes) {
            let bucket = &tensors[range];
            let mut flat = buckets::flatten(bucket)?;
            op(&self.group, &mut flat).map_err(|e| self.error(e))?;
            buckets::unflatten(&flat, bucket)?;
        }
        Ok(())
    }
}

/// Run a Gloo collective on `flat`: in place on the host, or, for a CUDA bucket, on a host
/// copy whose result is copied back (Gloo reduces host memory).
fn through_host(
    group: &Group,
    flat: &mut Tensor,
    op: impl FnOnce(&mut Tensor) -> Result<(), DistError>,
) -> Result<(), DistError> {
    if !flat.device().is_cuda() {
        return op(flat);
    }
    let bad = |e: tch::TchError| DistError::BadTensor {
        op: "copy through the host",
        group: group.name().into(),
        message: e.to_string(),
    };
    let mut host = flat.f_to(Device::Cpu).map_err(bad)?;
    op(&mut host)?;
    flat.f_copy_(&host).map_err(bad)?;
    Ok(())
}

/// A failed collective of `module`'s group, with the heartbeats' word on which peer is to
/// blame.
fn replica_error(store: &Store, world: usize, module: usize, cause: DistError) -> TrainError {
    TrainError::Replica { module, peers: liveness::diagnose(store, world), cause }
}

impl super::LocalModule {
    /// Join this module's group across the data-parallel replicas and take rank 0's state
    /// (after any checkpoint is restored); from then on every step averages gradients first.
    pub fn join_replicas(&mut self, r: &Replicas) -> Result<(), TrainError> {
        let mut sync = ReplicaSync::join(r, self.index, self.nets.vs.device())?;
        sync.take_rank0_state(&self.nets.state(), &self.opt.momentum_buffers)?;
        self.replicas = Some(sync);
        Ok(())
    }

    /// Take rank 0's values of every state tensor the optimizer does not train (BatchNorm
    /// running statistics and EMA twins, which differ between replicas); nothing without
    /// replicas. Trained parameters are equal on every rank already.
    pub fn take_rank0_buffers(&mut self) -> Result<(), TrainError> {
        let Some(sync) = &mut self.replicas else { return Ok(()) };
        let trained: std::collections::HashSet<String> =
            self.opt.params.iter().map(|(n, _)| n.clone()).collect();
        let buffers: Vec<Tensor> = self
            .nets
            .state()
            .into_iter()
            .filter(|(n, _)| !trained.contains(n))
            .map(|(_, t)| t)
            .collect();
        sync.broadcast_from_rank0(&buffers)
    }

    /// Why this module's replica group failed underneath it, if it did (see
    /// [`ReplicaSync::failure`]).
    pub fn replica_failure(&self) -> Option<TrainError> {
        self.replicas.as_ref()?.failure()
    }

    /// The library that reduces this module's gradients (`None` without replicas).
    pub fn reducer(&self) -> Option<Reducer> {
        self.replicas.as_ref().map(ReplicaSync::reducer)
    }

    /// What averaging this module's gradients across replicas has cost so far.
    pub fn replica_traffic(&self) -> Traffic {
        self.replicas.as_ref().map(ReplicaSync::traffic).unwrap_or_default()
    }
}

//! This process among the data-parallel replicas of a run: the rendezvous (`mlaan_dist`'s
//! store, served by rank 0 or by torchrun's agent), the agreements every rank must reach before
//! training (the same config, the run directory, the placement, the resume step), the slice of
//! a node's devices this rank takes, the stop step after a signal, and the replica groups the
//! engine all-reduces gradients in. With one process every method here is trivial and nothing
//! touches the network.

use anyhow::{bail, Context, Result};
use mlaan_core::config::{DistributedConfig, RunConfig};
use mlaan_core::device::DeviceSpec;
use mlaan_dist::{liveness, Bind, Heartbeat, Launch, Store};
use mlaan_engine::module::Replicas;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// This process's place in the run, and its connection to the others.
pub struct World {
    /// Tells the other ranks this one is alive (see `mlaan_dist::liveness`); stopped when
    /// this rank counts itself out, before rank 0's store goes away.
    heartbeat: std::sync::Mutex<Option<Heartbeat>>,
    launch: Launch,
    store: Option<Arc<Store>>,
    timeout: Duration,
    bucket_bytes: usize,
    bind: Bind,
    /// Numbers the agreements, so that each uses fresh keys.
    round: AtomicU64,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "World(rank {} of {})", self.launch.rank, self.launch.world)
    }
}

impl World {
    /// One process, no peers.
    pub fn single() -> World {
        World::alone(&DistributedConfig::default())
    }

    /// One process, with `cfg`'s settings (they only matter once there are peers).
    fn alone(cfg: &DistributedConfig) -> World {
        World {
            launch: Launch::single(),
            store: None,
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            bucket_bytes: (cfg.bucket_mb * (1 << 20) as f64) as usize,
            bind: Bind::Address("127.0.0.1".into()),
            heartbeat: std::sync::Mutex::new(None),
            round: AtomicU64::new(0),
        }
    }

    /// Join the run the environment describes (torchrun's or SLURM's variables; none: one
    /// process). Returns once every rank has connected, or fails naming those that did not.
    pub fn from_env(cfg: &DistributedConfig) -> Result<World> {
        World::join(Launch::from_env()?, cfg)
    }

    pub fn join(launch: Launch, cfg: &DistributedConfig) -> Result<World> {
        if cfg.world_size > 1 && cfg.world_size != launch.world {
            bail!(
                "distributed.world_size = {} but the launcher started {} process(es)",
                cfg.world_size,
                launch.world
            );
        }
        let alone = World::alone(cfg);
        if !launch.is_distributed() {
            return Ok(alone);
        }
        let timeout = alone.timeout;
        let (host, port) = (launch.master_addr.as_str(), launch.master_port);
        let store = if launch.serves_store() {
            Store::serve(host, port, timeout).with_context(|| {
                format!("rank 0 cannot serve the rendezvous store on port {port} (MASTER_PORT)")
            })?
        } else {
            Store::connect(host, port, timeout).with_context(|| {
                format!("rank {} cannot reach the rendezvous store at {host}:{port}", launch.rank)
            })?
        };
        let bind = match std::env::var("GLOO_SOCKET_IFNAME") {
            Ok(iface) if !iface.is_empty() => Bind::Interface(iface),
            _ if is_loopback(host) => Bind::Address("127.0.0.1".into()),
            _ => Bind::Address(this_host()),
        };
        let heartbeat = Heartbeat::start(&store, launch.rank)?;
        let world = World {
            launch,
            store: Some(Arc::new(store)),
            bind,
            heartbeat: std::sync::Mutex::new(Some(heartbeat)),
            ..alone
        };
        let who = format!("{} (pid {})", this_host(), std::process::id());
        let all = world.gather("hello", &who).context("waiting for every rank to start")?;
        tracing::info!(
            "rank {} of {}: every rank is here ({})",
            world.rank(),
            world.size(),
            all.iter().enumerate().map(|(r, w)| format!("{r}: {w}")).collect::<Vec<_>>().join(", ")
        );
        Ok(world)
    }

    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn size(&self) -> usize {
        self.launch.world
    }

    pub fn local_rank(&self) -> usize {
        self.launch.local_rank
    }

    pub fn local_size(&self) -> usize {
        self.launch.local_world
    }

    /// Rank 0 writes the run's files (metrics, checkpoints, summary, model); the others only
    /// train.
    pub fn is_leader(&self) -> bool {
        self.launch.rank == 0
    }

    /// What the engine needs to form the replica groups (`None` with one process).
    pub fn replicas(&self, reducers: Vec<mlaan_dist::Reducer>) -> Option<Replicas> {
        Some(Replicas {
            store: self.store.clone()?,
            rank: self.rank(),
            world: self.size(),
            bind: self.bind.clone(),
            timeout: self.timeout,
            bucket_bytes: self.bucket_bytes,
            reducers,
        })
    }

    /// `value` from every rank, by rank (each rank contributes its own).
    pub fn gather<T: Serialize + DeserializeOwned + Clone>(
        &self,
        what: &str,
        value: &T,
    ) -> Result<Vec<T>> {
        let Some(store) = &self.store else { return Ok(vec![value.clone()]) };
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        let key = |r: usize| format!("agree/{round}/{what}/{r}");
        store.set(&key(self.rank()), serde_json::to_string(value)?.as_bytes())?;
        let mut out = Vec::with_capacity(self.size());
        let mut missing = Vec::new();
        let mut last_error = None;
        for r in 0..self.size() {
            // After a first miss, only look: the time allowed is spent.
            let wait = if missing.is_empty() { self.timeout } else { Duration::from_millis(1) };
            match store.get(&key(r), wait) {
                Ok(bytes) => out.push(serde_json::from_slice(&bytes)?),
                Err(e) => {
                    missing.push(r);
                    last_error = Some(e);
                }
            }
        }
        if let Some(e) = last_error {
            bail!(
                "{what}: rank(s) {missing:?} did not answer within {:.0} s \
                 (distributed.timeout_s); did they start, or did they fail earlier? ({e})",
                self.timeout.as_secs_f64()
            );
        }
        Ok(out)
    }

    /// Rank 0's `decide()`, on every rank (the others do not call it).
    pub fn rank0_decides<T: Serialize + DeserializeOwned>(
        &self,
        what: &str,
        decide: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let Some(store) = &self.store else { return decide() };
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        let key = format!("decide/{round}/{what}");
        if self.is_leader() {
            let v = decide()?;
            store.set(&key, serde_json::to_string(&v)?.as_bytes())?;
            return Ok(v);
        }
        let bytes = store.get(&key, self.timeout).with_context(|| {
            format!("waiting for rank 0 to decide the {what} (did rank 0 fail?)")
        })?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Every rank must run the same resolved config: the error names each differing key
    /// with its value on rank 0 and on the rank that differs.
    pub fn agree_on_config(&self, cfg: &RunConfig) -> Result<()> {
        let all = self.gather("config", &cfg.to_toml())?;
        let flat = |text: &str| -> BTreeMap<String, String> {
            let table: toml::Table = toml::from_str(text).unwrap_or_default();
            let mut out = BTreeMap::new();
            flatten("", &toml::Value::Table(table), &mut out);
            out
        };
        let reference = flat(&all[0]);
        for (r, text) in all.iter().enumerate().skip(1) {
            let other = flat(text);
            let mut keys: Vec<&String> = reference.keys().chain(other.keys()).collect();
            keys.sort();
            keys.dedup();
            let none = "(unset)".to_string();
            let diffs: Vec<String> = keys
                .into_iter()
                .filter(|k| reference.get(*k) != other.get(*k))
                .map(|k| {
                    let (a, b) = (reference.get(k).unwrap_or(&none), other.get(k).unwrap_or(&none));
                    format!("{k} = {a} on rank 0 but {b} on rank {r}")
                })
                .collect();
            if !diffs.is_empty() {
                // Rank 0 serves the store: it must not vanish before the others have read.
                self.leave("config mismatch")?;
                bail!("the ranks were started with different configs: {}", diffs.join("; "));
            }
        }
        Ok(())
    }

    /// The devices this rank's pipeline runs on: its slice of the node's list (see
    /// `DeviceSpec::node_slice`).
    pub fn local_devices(&self, devices: &[DeviceSpec]) -> Result<Vec<DeviceSpec>> {
        DeviceSpec::node_slice(devices, self.local_rank(), self.local_size())
            .map_err(anyhow::Error::msg)
    }

    /// Cores this process may use: the machine's, shared among the processes of the node.
    pub fn local_cores(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.local_size()).max(1)
    }

    /// The step every rank stops at after a stop request (a signal on any rank), once one is
    /// known: `requested` is this rank's own signal flag, `next` the batch it would feed next.
    /// With one process that is simply `next`. Across ranks the first rank to ask proposes
    /// `next + margin`, where `margin` exceeds how far ahead of it another rank can be (the
    /// all-reduce of every step bounds that by the batches in flight); every rank stops there.
    pub fn stop_step(&self, requested: bool, next: u64, margin: u64) -> Result<Option<u64>> {
        let Some(store) = &self.store else { return Ok(requested.then_some(next)) };
        // Polled every batch, so it is often what first meets a dead rank 0 (which serves the
        // store): the error says who is gone, as a failed collective's does.
        self.poll_stop(store, requested, next, margin).map_err(|e| {
            anyhow::anyhow!(
                "the replica group's store, asked for a stop request: {e:#}; {}",
                liveness::diagnose(store, self.size())
            )
        })
    }

    fn poll_stop(
        &self,
        store: &Store,
        requested: bool,
        next: u64,
        margin: u64,
    ) -> Result<Option<u64>> {
        const KEY: &str = "stop/step";
        if requested && store.add("stop/asked", 0)? == 0 && store.add("stop/asked", 1)? == 1 {
            let step = next + margin;
            tracing::info!("rank {}: stop requested; every rank stops at step {step}", self.rank());
            store.set(KEY, step.to_string().as_bytes())?;
        }
        if !store.contains(KEY)? {
            return Ok(None);
        }
        let text = String::from_utf8(store.get(KEY, self.timeout)?)?;
        Ok(Some(text.trim().parse()?))
    }

    /// Wait until every rank has finished with the store before rank 0, which serves it,
    /// exits: a rank still reading from it would see the server vanish.
    pub fn finish(&self) -> Result<()> {
        self.leave("finished")
    }

    /// Count this rank out under `what`; rank 0 waits until every rank has (the others
    /// never read from the store again).
    fn leave(&self, what: &str) -> Result<()> {
        let Some(store) = &self.store else { return Ok(()) };
        drop(self.heartbeat.lock().unwrap_or_else(|e| e.into_inner()).take());
        let key = format!("leave/{what}");
        let done = store.add(&key, 1)?;
        if !self.is_leader() {
            return Ok(());
        }
        let start = std::time::Instant::now();
        let mut done = done as usize;
        while done < self.size() {
            if start.elapsed() > self.timeout {
                bail!(
                    "{what}: only {done} of {} ranks got there within {:.0} s \
                     (distributed.timeout_s); {}",
                    self.size(),
                    self.timeout.as_secs_f64(),
                    liveness::diagnose(store, self.size())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
            done = store.add(&key, 0)? as usize;
        }
        Ok(())
    }
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

/// This machine's host name (what peers on other nodes resolve).
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

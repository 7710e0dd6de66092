//! Who this process is among its peers, read from the environment the launchers set, as
//! PyTorch's `env://` rendezvous reads it:
//!
//! - torchrun (and `mlaan-pipe launch`): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!   `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; under torchrun's agent
//!   (`TORCHELASTIC_USE_AGENT_STORE=True`) the agent already serves the store, so every rank,
//!   rank 0 included, connects as a client.
//! - SLURM, inside an `srun` step: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`,
//!   `SLURM_STEP_TASKS_PER_NODE`; the master is the first host of the step's node list, the port
//!   `MASTER_PORT` or 15000 + the job id's last four digits (as Lightning derives it).
//! - neither: one process, exactly as without any of this.

use crate::DistError;

/// Which launcher described this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchSource {
    Single,
    Torchrun,
    Slurm,
}

/// This process's place among its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub source: LaunchSource,
    pub rank: usize,
    pub world: usize,
    /// Rank among the processes of this node, and how many there are.
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The launcher's agent serves the store: rank 0 connects instead of serving.
    pub agent_store: bool,
}

/// The port torchrun and PyTorch use when none is given.
pub const DEFAULT_PORT: u16 = 29500;

impl Launch {
    /// One process, no peers.
    pub fn single() -> Launch {
        Launch {
            source: LaunchSource::Single,
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
            agent_store: false,
        }
    }

    /// Read the process environment.
    pub fn from_env() -> Result<Launch, DistError> {
        Launch::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Read the rendezvous from `var` (the environment, or a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Launch, DistError> {
        if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            return torchrun(&var);
        }
        if var("SLURM_STEP_NUM_TASKS").is_some() && var("SLURM_PROCID").is_some() {
            return slurm(&var);
        }
        Ok(Launch::single())
    }

    /// The torchrun variables that describe this process to a child (what `from_env` reads).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }

    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }

    /// Whether this process serves the store.
    pub fn serves_store(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }
}

fn number(var: &impl Fn(&str) -> Option<String>, key: &str) -> Result<Option<usize>, DistError> {
    match var(key) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| DistError::Env(format!("{key}={v} is not a non-negative integer"))),
    }
}

fn required(
    var: &impl Fn(&str) -> Option<String>,
    key: &str,
    why: &str,
) -> Result<usize, DistError> {
    number(var, key)?.ok_or_else(|| DistError::Env(format!("{key} is not set ({why})")))
}

fn port(var: &impl Fn(&str) -> Option<String>, default: u16) -> Result<u16, DistError> {
    match var("MASTER_PORT") {
        None => Ok(default),
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(DistError::Env(format!("MASTER_PORT={v} is not a port (1-65535)"))),
        },
    }
}

fn check(l: Launch) -> Result<Launch, DistError> {
    let fail = |m: String| Err(DistError::Env(m));
    if l.world == 0 {
        return fail("the world size is 0".into());
    }
    if l.rank >= l.world {
        return fail(format!("rank {} is not below the world size {}", l.rank, l.world));
    }
    if l.local_world == 0 || l.local_rank >= l.local_world {
        return fail(format!(
            "local rank {} is not below the local world size {}",
            l.local_rank, l.local_world
        ));
    }
    if l.local_world > l.world {
        return fail(format!(
            "{} processes on this node but only {} in all",
            l.local_world, l.world
        ));
    }
    Ok(l)
}

fn torchrun(var: &impl Fn(&str) -> Option<String>) -> Result<Launch, DistError> {
    let why = "torchrun sets RANK and WORLD_SIZE together";
    let rank = required(var, "RANK", why)?;
    let world = required(var, "WORLD_SIZE", why)?;
    let master_addr = match var("MASTER_ADDR") {
        Some(a) => a,
        None if world == 1 => "127.0.0.1".into(),
        None => {
            return Err(DistError::Env(format!(
                "WORLD_SIZE={world} but MASTER_ADDR is not set: say where rank 0 serves the \
                 store (torchrun and mlaan-pipe launch set it)"
            )))
        }
    };
    check(Launch {
        source: LaunchSource::Torchrun,
        rank,
        world,
        local_rank: number(var, "LOCAL_RANK")?.unwrap_or(rank),
        local_world: number(var, "LOCAL_WORLD_SIZE")?.unwrap_or(world),
        master_addr,
        master_port: port(var, DEFAULT_PORT)?,
        agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
    })
}

fn slurm(var: &impl Fn(&str) -> Option<String>) -> Result<Launch, DistError> {
    let why = "srun sets it for every task";
    let rank = required(var, "SLURM_PROCID", why)?;
    let world = required(var, "SLURM_STEP_NUM_TASKS", why)?;
    let local_rank = number(var, "SLURM_LOCALID")?.unwrap_or(0);
    let local_world = match var("SLURM_STEP_TASKS_PER_NODE") {
        Some(v) => first_count(&v).ok_or_else(|| {
            DistError::Env(format!("SLURM_STEP_TASKS_PER_NODE={v} is not like '2(x3),1'"))
        })?,
        None => 1,
    };
    let nodes = var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_NODELIST"));
    let master_addr = match (var("MASTER_ADDR"), nodes) {
        (Some(a), _) => a,
        (None, Some(list)) => first_host(&list).ok_or_else(|| {
            DistError::Env(format!("cannot read the first host of SLURM_NODELIST={list}"))
        })?,
        (None, None) => {
            return Err(DistError::Env(
                "SLURM_NODELIST is not set and MASTER_ADDR is not either".into(),
            ))
        }
    };
    let job_port = var("SLURM_JOB_ID")
        .and_then(|j| j.trim().parse::<u64>().ok())
        .map(|j| 15000 + (j % 10000) as u16)
        .unwrap_or(DEFAULT_PORT);
    check(Launch {
        source: LaunchSource::Slurm,
        rank,
        world,
        local_rank,
        local_world,
        master_addr,
        master_port: port(var, job_port)?,
        agent_store: false,
    })
}

/// The first count of a SLURM tasks-per-node list: `2(x3),1` → 2.
fn first_count(s: &str) -> Option<usize> {
    let head = s.split(',').next()?;
    head.split('(').next()?.trim().parse().ok().filter(|n| *n > 0)
}

/// The first host of a SLURM node list: `gpu[03-05,9],cpu1` → `gpu03`, `a,b` → `a`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if !list[end..].starts_with('[') {
        return (!prefix.is_empty()).then(|| prefix.to_string());
    }
    let inside = &list[end + 1..list[end..].find(']')? + end];
    let first = inside.split([',', '-']).next()?.trim();
    if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let close = end + 1 + inside.len();
    let suffix: String = list[close + 1..].chars().take_while(|c| *c != ',').collect();
    Some(format!("{prefix}{first}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch, DistError> {
        let m: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_one_process() {
        assert_eq!(launch(&[]).unwrap(), Launch::single());
    }

    #[test]
    fn torchrun_variables() {
        let l = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.local_world), (3, 4, 1, 2));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("node7", 29400));
        assert!(l.agent_store && !l.serves_store());
        assert_eq!(l.source, LaunchSource::Torchrun);
    }

    #[test]
    fn torchrun_without_master_address_is_an_error() {
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        let e = launch(&[("RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE is not set"), "{e}");
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2 is not below the world size 2"), "{e}");
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK=x"), "{e}");
        let e = launch(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "0"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("MASTER_PORT=0"), "{e}");
    }

    #[test]
    fn slurm_step_variables() {
        let l = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.local_world), (5, 8, 1, 4));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("gpu07", 15000 + 3456));
        assert!(!l.agent_store);
        // torchrun's variables win under `srun torchrun`.
        let l = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "a"),
        ])
        .unwrap();
        assert_eq!((l.source, l.rank, l.world), (LaunchSource::Torchrun, 1, 4));
        // The batch script itself (no srun step) is one process.
        let l = launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]).unwrap();
        assert_eq!(l, Launch::single());
    }

    #[test]
    fn first_hosts_of_node_lists() {
        assert_eq!(first_host("node1").as_deref(), Some("node1"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("gpu[03-05,9],cpu1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("r[1-2]-ib").as_deref(), Some("r1-ib"));
        assert_eq!(first_host("x[,]"), None);
        assert_eq!(first_host(""), None);
    }
}

//! Which library reduces each module's gradients across the replicas
//! (`distributed.backend`), chosen by all ranks together so that a group's ranks agree: NCCL
//! for a module on a GPU when NCCL loads on every rank and every rank has that module on a GPU
//! of its own (NCCL refuses two ranks of one communicator on one GPU, "duplicate GPU"), Gloo
//! otherwise. `auto` falls back to Gloo and says why; `nccl` asked for by name fails at start,
//! saying why, before NCCL itself would.

use crate::devices;
use crate::distributed::World;
use anyhow::Result;
use mlaan_core::config::Backend;
use mlaan_dist::Reducer;
use serde::{Deserialize, Serialize};
use tch::Device;

/// What one rank knows, for the choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankFacts {
    pub host: String,
    /// Per module: the GPU it is on (its UUID, or `host/cuda:N` when the driver cannot say),
    /// `None` on the CPU.
    pub gpus: Vec<Option<String>>,
    /// NCCL's version here, or why it does not load.
    pub nccl: Result<String, String>,
}

impl RankFacts {
    /// This rank's facts for modules on `module_devices`.
    pub fn here(module_devices: &[Device]) -> RankFacts {
        let host = crate::distributed::this_host();
        let uuids = devices::cuda_gpus().ok();
        let gpus = module_devices
            .iter()
            .map(|d| match d {
                Device::Cuda(i) => Some(
                    uuids
                        .as_ref()
                        .and_then(|g| g.get(*i))
                        .map_or_else(|| format!("{host}/cuda:{i}"), |g| g.uuid.clone()),
                ),
                _ => None,
            })
            .collect();
        let nccl = if module_devices.iter().any(|d| d.is_cuda()) {
            mlaan_dist::nccl::load().map(|l| l.version).map_err(|e| e.to_string())
        } else {
            Err("no module is on a GPU".into())
        };
        RankFacts { host, gpus, nccl }
    }
}

/// The choice: a reducer per module, and why any module that could have had NCCL has Gloo.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub reducers: Vec<Reducer>,
    pub notes: Vec<String>,
}

/// The rule, from every rank's facts (by rank).
pub fn decide(setting: Backend, facts: &[RankFacts]) -> Result<Choice, String> {
    let k = facts.first().map_or(0, |f| f.gpus.len());
    let mut choice = Choice { reducers: vec![Reducer::Gloo; k], notes: Vec::new() };
    if setting == Backend::Gloo {
        return Ok(choice);
    }
    for m in 0..k {
        let why_not = nccl_obstacle(m, facts);
        match (why_not, setting) {
            (None, _) => choice.reducers[m] = Reducer::Nccl,
            (Some(why), Backend::Nccl) => {
                return Err(format!("distributed.backend = \"nccl\": module {m}: {why}"))
            }
            (Some(why), _) => {
                if facts.iter().all(|f| f.gpus[m].is_some()) {
                    choice.notes.push(format!("module {m} reduces with Gloo: {why}"));
                }
            }
        }
    }
    Ok(choice)
}

/// Why module `m`'s group cannot use NCCL, or `None` when it can.
fn nccl_obstacle(m: usize, facts: &[RankFacts]) -> Option<String> {
    if let Some(r) = facts.iter().position(|f| f.gpus[m].is_none()) {
        return Some(format!("rank {r} has it on the CPU"));
    }
    if let Some((r, f)) = facts.iter().enumerate().find(|(_, f)| f.nccl.is_err()) {
        let why = f.nccl.as_ref().err().map_or("", String::as_str);
        return Some(format!("NCCL does not load on rank {r} ({}): {why}", f.host));
    }
    for (a, fa) in facts.iter().enumerate() {
        for (b, fb) in facts.iter().enumerate().skip(a + 1) {
            if fa.gpus[m] == fb.gpus[m] {
                return Some(format!(
                    "ranks {a} and {b} both have it on GPU {} (host {}): NCCL takes one rank \
                     per GPU in a communicator; give each rank its own GPUs (--gpus with a slice \
                     per local rank) or use Gloo",
                    fa.gpus[m].as_deref().unwrap_or("?"),
                    fa.host
                ));
            }
        }
    }
    None
}

/// Choose with every rank (one gather through the store); rank 0 logs what `auto` fell back
/// from.
pub fn choose(world: &World, setting: Backend, module_devices: &[Device]) -> Result<Choice> {
    let facts = world.gather("reducers", &RankFacts::here(module_devices))?;
    let choice = decide(setting, &facts).map_err(anyhow::Error::msg)?;
    if world.is_leader() {
        for note in &choice.notes {
            tracing::info!("{note}");
        }
        tracing::info!("replica groups reduce with: {}", describe(&choice.reducers));
    }
    Ok(choice)
}

/// `nccl for modules 0-3, gloo for 4` style.
pub fn describe(reducers: &[Reducer]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < reducers.len() {
        let mut j = i;
        while j + 1 < reducers.len() && reducers[j + 1] == reducers[i] {
            j += 1;
        }
        let span = if i == j { format!("module {i}") } else { format!("modules {i}-{j}") };
        parts.push(format!("{} for {span}", reducers[i]));
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(host: &str, gpus: &[Option<&str>], nccl: bool) -> RankFacts {
        RankFacts {
            host: host.into(),
            gpus: gpus.iter().map(|g| g.map(String::from)).collect(),
            nccl: if nccl { Ok("2.28.9".into()) } else { Err("libnccl.so.2 missing".into()) },
        }
    }

    #[test]
    fn auto_takes_nccl_where_every_rank_has_its_own_gpu() {
        let facts = [
            rank("a", &[Some("GPU-0"), Some("GPU-1")], true),
            rank("a", &[Some("GPU-2"), Some("GPU-3")], true),
        ];
        let c = decide(Backend::Auto, &facts).unwrap();
        assert_eq!(c.reducers, [Reducer::Nccl, Reducer::Nccl]);
        assert!(c.notes.is_empty());
        assert_eq!(decide(Backend::Gloo, &facts).unwrap().reducers, [Reducer::Gloo; 2]);
    }

    #[test]
    fn two_ranks_on_one_gpu_are_told_before_nccl_refuses_them() {
        // Module 1 of both ranks on the same GPU (`--gpus 0,0` with two local ranks).
        let facts = [
            rank("a", &[Some("GPU-0"), Some("GPU-1")], true),
            rank("a", &[Some("GPU-2"), Some("GPU-1")], true),
        ];
        let c = decide(Backend::Auto, &facts).unwrap();
        assert_eq!(c.reducers, [Reducer::Nccl, Reducer::Gloo]);
        assert!(c.notes[0].contains("module 1") && c.notes[0].contains("ranks 0 and 1"), "{c:?}");
        let e = decide(Backend::Nccl, &facts).unwrap_err();
        assert!(e.contains("module 1") && e.contains("GPU GPU-1") && e.contains("one rank"), "{e}");
    }

    #[test]
    fn cpu_modules_and_a_missing_nccl_take_gloo_or_fail_by_name() {
        let facts =
            [rank("a", &[None, Some("GPU-0")], true), rank("b", &[None, Some("GPU-0")], false)];
        let c = decide(Backend::Auto, &facts).unwrap();
        assert_eq!(c.reducers, [Reducer::Gloo, Reducer::Gloo]);
        // Nothing to say about a CPU module; the GPU module's fallback is named.
        assert_eq!(c.notes.len(), 1);
        assert!(c.notes[0].contains("rank 1 (b)") && c.notes[0].contains("missing"), "{c:?}");
        let e = decide(Backend::Nccl, &facts).unwrap_err();
        assert!(e.contains("module 0") && e.contains("CPU"), "{e}");
    }

    #[test]
    fn reducers_read_as_runs() {
        let r = [Reducer::Nccl, Reducer::Nccl, Reducer::Gloo, Reducer::Nccl];
        assert_eq!(describe(&r), "nccl for modules 0-1, gloo for module 2, nccl for module 3");
    }
}

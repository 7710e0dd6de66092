//! Device lists as the user writes them: `--devices cpu,cpu` or `--gpus 0,1,2,3`.

use crate::error::PlanError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One device a stage can run on; in a config, the string `cpu`, `cuda:N` or `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Parse `cpu`, `cuda:N` or a bare GPU index `N`.
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        let s = s.trim();
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        let idx = s.strip_prefix("cuda:").unwrap_or(s);
        idx.parse::<usize>()
            .map(DeviceSpec::Cuda)
            .map_err(|_| format!("`{s}` is not a device (cpu, cuda:N, or a GPU index N)"))
    }

    /// Parse a comma-separated list.
    pub fn parse_list(list: &str) -> Result<Vec<DeviceSpec>, PlanError> {
        let devices: Vec<DeviceSpec> = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(DeviceSpec::parse)
            .collect::<Result<_, _>>()
            .map_err(|reason| PlanError::Device { spec: list.to_string(), reason })?;
        if devices.is_empty() {
            return Err(PlanError::Device { spec: list.into(), reason: "no device named".into() });
        }
        Ok(devices)
    }

    /// GPU indices as `--gpus 0,1` gives them.
    pub fn gpus(list: &str) -> Result<Vec<DeviceSpec>, PlanError> {
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse::<usize>().map(DeviceSpec::Cuda).map_err(|_| PlanError::Device {
                    spec: list.to_string(),
                    reason: format!("`{}` is not a GPU index", s.trim()),
                })
            })
            .collect()
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// The devices of local rank `rank` of `per_node` processes on a node, out of the node's
    /// list: GPUs are split, rank r taking the r-th of `per_node` equal consecutive slices
    /// (`0,1,2,3` over 2 processes: `0,1` and `2,3`); CPU devices are shared, every rank
    /// getting the whole list. A GPU list that does not split evenly is an error.
    pub fn node_slice(
        devices: &[DeviceSpec],
        rank: usize,
        per_node: usize,
    ) -> Result<Vec<DeviceSpec>, String> {
        if per_node <= 1 || !devices.iter().all(|d| d.is_cuda()) {
            return Ok(devices.to_vec());
        }
        if devices.len() < per_node || !devices.len().is_multiple_of(per_node) {
            return Err(format!(
                "{} GPU(s) in pipeline.devices cannot be split evenly among the {per_node} \
                 processes of this node (LOCAL_WORLD_SIZE); give a multiple of {per_node}",
                devices.len()
            ));
        }
        let per = devices.len() / per_node;
        Ok(devices[rank * per..][..per].to_vec())
    }

    /// The devices as a config writes them (`["cpu", "cuda:1"]`), for reports.
    pub fn names(devices: &[DeviceSpec]) -> Vec<String> {
        devices.iter().map(ToString::to_string).collect()
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        DeviceSpec::parse(&s)
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Intra-op threads per CPU stage: the cores divided among the stages that share them, at
/// least one, never more than the cores (two stages on two cores get one thread each).
pub fn cpu_threads_per_stage(cores: usize, cpu_stages: usize) -> usize {
    (cores / cpu_stages.max(1)).max(1)
}

/// Intra-op threads of CPU stages by their measured cost: each stage its share of the cores,
/// rounded so that the shares add up to the cores (largest remainders), at least one. OpenMP
/// workers spin between parallel regions, so a thread beyond the cores takes a core from
/// another stage rather than an idle one; the one exception is a stage whose share rounds to
/// none: it idles most of the time, and its one thread leaves its core to the others.
pub fn cpu_threads_by_cost(cores: usize, costs: &[f64]) -> Vec<usize> {
    let total: f64 = costs.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return vec![cpu_threads_per_stage(cores, costs.len()); costs.len()];
    }
    let share: Vec<f64> = costs.iter().map(|c| cores as f64 * c / total).collect();
    let mut threads: Vec<usize> = share.iter().map(|s| s.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..costs.len()).collect();
    by_remainder.sort_by(|&a, &b| share[b].fract().total_cmp(&share[a].fract()));
    let left = cores.saturating_sub(threads.iter().sum());
    for &s in by_remainder.iter().take(left) {
        threads[s] += 1;
    }
    threads.into_iter().map(|t| t.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        assert_eq!(
            DeviceSpec::parse_list("cpu,cuda:1, 2").unwrap(),
            vec![DeviceSpec::Cpu, DeviceSpec::Cuda(1), DeviceSpec::Cuda(2)]
        );
        assert_eq!(
            DeviceSpec::gpus("0,1").unwrap(),
            vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]
        );
        let e = DeviceSpec::parse_list("cpu,tpu").unwrap_err().to_string();
        assert!(e.contains("tpu"), "{e}");
        assert!(DeviceSpec::gpus("0,x").unwrap_err().to_string().contains("`x`"));
        assert!(DeviceSpec::parse_list("").is_err());
    }

    #[test]
    fn threads_divide_cores() {
        assert_eq!(cpu_threads_per_stage(2, 2), 1);
        assert_eq!(cpu_threads_per_stage(2, 1), 2);
        assert_eq!(cpu_threads_per_stage(2, 4), 1);
        assert_eq!(cpu_threads_per_stage(16, 4), 4);
        assert_eq!(cpu_threads_by_cost(2, &[0.2, 0.44]), vec![1, 1]);
        assert_eq!(cpu_threads_by_cost(2, &[0.3, 0.3]), vec![1, 1]);
        assert_eq!(cpu_threads_by_cost(16, &[1.0, 3.0]), vec![4, 12]);
        assert_eq!(cpu_threads_by_cost(8, &[0.5, 0.2, 0.3]), vec![4, 2, 2]);
        assert_eq!(cpu_threads_by_cost(2, &[0.0, 0.0]), vec![1, 1]);
        assert_eq!(cpu_threads_by_cost(4, &[]), Vec::<usize>::new());
        // A stage with under half a core's share idles: the busy one takes both cores.
        assert_eq!(cpu_threads_by_cost(2, &[35.0, 8.0]), vec![2, 1]);
        assert_eq!(cpu_threads_by_cost(1, &[0.2, 0.7]), vec![1, 1]);
        // Otherwise never more threads than cores, and no core left unused.
        for cores in 2..20 {
            let t = cpu_threads_by_cost(cores, &[0.25, 0.45, 0.3]);
            assert_eq!(t.iter().sum::<usize>(), cores.max(3), "{cores} cores: {t:?}");
        }
    }

    #[test]
    fn a_node_slices_gpus_among_its_processes_and_shares_cpus() {
        let gpus = DeviceSpec::gpus("0,1,2,3").unwrap();
        let slice = |r, l| DeviceSpec::names(&DeviceSpec::node_slice(&gpus, r, l).unwrap());
        assert_eq!(slice(0, 2), ["cuda:0", "cuda:1"]);
        assert_eq!(slice(1, 2), ["cuda:2", "cuda:3"]);
        assert_eq!(slice(3, 4), ["cuda:3"]);
        assert_eq!(slice(0, 1), ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]);
        let e = DeviceSpec::node_slice(&gpus, 0, 3).unwrap_err();
        assert!(e.contains("cannot be split evenly among the 3") && e.contains("LOCAL_WORLD_SIZE"));
        assert!(DeviceSpec::node_slice(&gpus[..1], 0, 2).is_err());
        let cpus = vec![DeviceSpec::Cpu; 2];
        assert_eq!(DeviceSpec::node_slice(&cpus, 1, 2).unwrap(), cpus);
    }
}

//! Placing K modules on D devices. K ≤ D: one module per device. K > D: consecutive modules
//! share a device, grouped so that the largest per-device cost is as small as possible (the
//! pipeline runs at the pace of its slowest stage). Costs come from a measured profile or, as
//! a fallback, from FLOPs.

use crate::error::PlanError;
use serde::{Deserialize, Serialize};

/// Which modules run on which device: `groups[s]` is the module range of stage `s`, run on
/// device `s`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub groups: Vec<std::ops::Range<usize>>,
}

impl Placement {
    pub fn num_stages(&self) -> usize {
        self.groups.len()
    }
    /// Stage that runs module `m`.
    pub fn stage_of(&self, m: usize) -> usize {
        self.groups.iter().position(|g| g.contains(&m)).expect("module is placed")
    }
}

/// Split `costs` into at most `devices` contiguous groups minimising the maximum group sum
/// (linear partition by dynamic programming; ties prefer fewer modules on earlier devices).
pub fn place(costs: &[f64], devices: usize) -> Result<Placement, PlanError> {
    let k = costs.len();
    if k == 0 {
        return Err(PlanError::Placement("no modules to place".into()));
    }
    if devices == 0 {
        return Err(PlanError::Placement("no devices".into()));
    }
    if let Some(i) = costs.iter().position(|c| !c.is_finite() || *c < 0.0) {
        return Err(PlanError::Placement(format!("module {i} has cost {}", costs[i])));
    }
    if k <= devices {
        return Ok(Placement { groups: (0..k).map(|m| m..m + 1).collect() });
    }
    let d = devices;
    let mut prefix = vec![0.0; k + 1];
    for i in 0..k {
        prefix[i + 1] = prefix[i] + costs[i];
    }
    // best[j][i]: minimal max-cost of the first i modules on j devices; cut[j][i]: start of the last group.
    let mut best = vec![vec![f64::INFINITY; k + 1]; d + 1];
    let mut cut = vec![vec![0usize; k + 1]; d + 1];
    best[0][0] = 0.0;
    for j in 1..=d {
        for i in j..=k {
            for s in (j - 1)..i {
                let v = best[j - 1][s].max(prefix[i] - prefix[s]);
                if v < best[j][i] - 1e-12 {
                    best[j][i] = v;
                    cut[j][i] = s;
                }
            }
        }
    }
    let mut groups = Vec::with_capacity(d);
    let mut end = k;
    for j in (1..=d).rev() {
        let s = cut[j][end];
        groups.push(s..end);
        end = s;
    }
    groups.reverse();
    Ok(Placement { groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_device_when_enough_devices() {
        let p = place(&[1.0, 2.0, 3.0], 4).unwrap();
        assert_eq!(p.groups, vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn minimises_the_largest_group() {
        let p = place(&[4.0, 1.0, 1.0, 1.0, 1.0, 4.0], 3).unwrap();
        assert_eq!(p.groups, vec![0..1, 1..5, 5..6]);
        let p = place(&[1.0; 8], 2).unwrap();
        assert_eq!(p.groups, vec![0..4, 4..8]);
        assert_eq!(p.stage_of(5), 1);
        // Brute force agreement on a small irregular case.
        let costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
        let p = place(&costs, 3).unwrap();
        let max = |p: &Placement| {
            p.groups.iter().map(|g| costs[g.clone()].iter().sum::<f64>()).fold(0.0, f64::max)
        };
        let mut brute = f64::INFINITY;
        for a in 1..costs.len() {
            for b in a + 1..costs.len() {
                let m = [0..a, a..b, b..costs.len()]
                    .iter()
                    .map(|g| costs[g.clone()].iter().sum::<f64>())
                    .fold(0.0, f64::max);
                brute = brute.min(m);
            }
        }
        assert_eq!(max(&p), brute);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(place(&[], 2).is_err());
        assert!(place(&[1.0], 0).is_err());
        let e = place(&[1.0, f64::NAN], 1).unwrap_err().to_string();
        assert!(e.contains("module 1"), "{e}");
    }
}

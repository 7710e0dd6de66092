//! LAM (leap augmented module) chains of MLAAN: for step i, a short chain of trainable copies
//! of *later* backbone blocks that carries h_i to the last stage's width before the cascade
//! head. The first chain block is also summed with an EMA twin of the real block.
//!
//! Three sources, printed by `plan`:
//! - the official MLAAN code's tables (`configAuxPlus_new.py` at commit 70effbe), for the
//!   splits that code trains (ResNet-32 K = 8 and 15, ResNet-110 K = 32 and 54;
//!   `source = "official"`);
//! - the MLAAN table for ResNet-32 (docs/method.md §4), keyed by the block that ends the module;
//! - a rule for everything else: the chain has depth
//!   `round(d·(1 − i·c/(K−2)) + i·c/(K−2))` (AugLocal's pyramid), clamped to what is
//!   available; it always contains the first block of every later stage (so shapes line up)
//!   and fills the remaining slots with later blocks spaced evenly back from the last block.

use crate::arch::{ArchSpec, BlockRef};
use crate::error::PlanError;
use crate::split::Split;
use serde::{Deserialize, Serialize};

/// The chain of backbone blocks that the LAM of one step copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LamChain {
    /// The step (module index) whose cascade loss trains this chain.
    pub step: usize,
    pub blocks: Vec<BlockRef>,
    /// Module that owns the real block of `blocks[0]`, the source of the EMA twin.
    pub ema_source_module: usize,
    /// Whether the twin follows its real block (`method.ema_update`); a frozen twin stays the
    /// copy of the block at initialisation.
    pub ema_follows: bool,
}

/// Parameters of the chain rule and where chains come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LamConfig {
    /// `auto` (the paper's ResNet-32 table where one exists, else the rule), `official` (the
    /// official code's table for this architecture and split; an error where it has none) or
    /// `rule`.
    pub source: String,
    /// Chain depth at the first step (AugLocal's d).
    pub depth: usize,
    /// Pyramid coefficient c in [0,1]: how fast chains shorten toward the output.
    pub pyramid: f64,
}

impl Default for LamConfig {
    fn default() -> Self {
        LamConfig { source: "auto".into(), depth: 4, pyramid: 0.5 }
    }
}

/// MLAAN's ResNet-32 chains, keyed by the block that ends the module.
fn resnet32_table(end: BlockRef) -> Option<Vec<[usize; 2]>> {
    Some(match (end.stage, end.index) {
        (1, _) => vec![[2, 0], [3, 0], [3, 2], [3, 4]],
        (2, _) => vec![[3, 0], [3, 2], [3, 3], [3, 4]],
        (3, 0) => vec![[3, 1], [3, 2], [3, 4]],
        (3, 1) => vec![[3, 2], [3, 3], [3, 4]],
        (3, 2) => vec![[3, 3], [3, 4]],
        (3, 3) => vec![[3, 4]],
        _ => return None,
    })
}

/// Module ends of an official table's split.
enum OfficialEnds {
    /// One module per block (the stem merged into module 0).
    EveryBlock,
    /// The last block of modules 0..K−1.
    List(&'static [[usize; 2]]),
}

/// One table of the official code: the architecture, the split it was made for, and runs of
/// consecutive steps that share one chain, `(first step, last step, chain)`.
struct OfficialTable {
    arch: &'static str,
    k: usize,
    ends: OfficialEnds,
    runs: &'static [(usize, usize, &'static [[usize; 2]])],
}

const R32_A: &[[usize; 2]] = &[[2, 0], [3, 0], [3, 2], [3, 4]];
const R32_B: &[[usize; 2]] = &[[2, 0], [3, 0], [3, 3], [3, 4]];
const R32_C: &[[usize; 2]] = &[[3, 0], [3, 2], [3, 3], [3, 4]];
const R110_A: &[[usize; 2]] = &[[2, 0], [3, 0], [3, 2], [3, 17]];
const R110_B: &[[usize; 2]] = &[[3, 0], [3, 2], [3, 3], [3, 17]];
const R110_C: &[[usize; 2]] = &[[3, 0], [3, 3], [3, 4], [3, 17]];

/// `configAuxPlus_new.py`'s `InfoPro_Aux` with `config2.py`'s splits. Entry j of the official
/// list is the chain of module j; entry 0 (module 0 has no loss) and entries past K−2 are
/// never used there, so they are not here either.
const OFFICIAL: &[OfficialTable] = &[
    OfficialTable {
        arch: "resnet32",
        k: 8,
        ends: OfficialEnds::List(&[[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2], [3, 4]]),
        runs: &[
            (1, 1, R32_A),
            (2, 2, R32_B),
            (3, 4, R32_C),
            (5, 5, &[[3, 2], [3, 3], [3, 4]]),
            (6, 6, &[[3, 3], [3, 4]]),
        ],
    },
    OfficialTable {
        arch: "resnet32",
        k: 15,
        ends: OfficialEnds::EveryBlock,
        runs: &[
            (1, 1, R32_A),
            (2, 2, R32_B),
            (3, 3, R32_A),
            (4, 4, R32_B),
            (5, 9, R32_C),
            (10, 10, &[[3, 1], [3, 2], [3, 4]]),
            (11, 11, &[[3, 2], [3, 3], [3, 4]]),
            (12, 12, &[[3, 3], [3, 4]]),
            (13, 13, &[[3, 4]]),
        ],
    },
    OfficialTable {
        arch: "resnet110",
        k: 32,
        ends: OfficialEnds::List(&OFFICIAL_R110_K32_ENDS),
        runs: &[
            (1, 10, R110_A),
            (11, 20, R110_B),
            (21, 21, R110_C),
            (22, 25, &[[3, 8], [3, 17]]),
            (26, 27, &[[3, 14], [3, 17]]),
            (28, 28, &[[3, 15], [3, 17]]),
            (29, 29, &[[3, 16], [3, 17]]),
            (30, 30, &[[3, 17]]),
        ],
    },
    OfficialTable {
        arch: "resnet110",
        k: 54,
        ends: OfficialEnds::EveryBlock,
        runs: &[
            (1, 17, R110_A),
            (18, 34, R110_B),
            (35, 35, R110_C),
            (36, 42, &[[3, 8], [3, 17]]),
            (43, 46, &[[3, 14], [3, 17]]),
            (47, 48, &[[3, 15], [3, 17]]),
            (49, 51, &[[3, 16], [3, 17]]),
            (52, 52, &[[3, 17]]),
        ],
    },
];

/// `config2.py`'s ResNet-110 K = 32 split (the last block of every module).
const OFFICIAL_R110_K32_ENDS: [[usize; 2]; 32] = [
    [1, 1],
    [1, 2],
    [1, 4],
    [1, 5],
    [1, 7],
    [1, 9],
    [1, 11],
    [1, 13],
    [1, 14],
    [1, 16],
    [1, 17],
    [2, 1],
    [2, 2],
    [2, 4],
    [2, 5],
    [2, 7],
    [2, 9],
    [2, 11],
    [2, 13],
    [2, 14],
    [2, 16],
    [2, 17],
    [3, 1],
    [3, 3],
    [3, 4],
    [3, 6],
    [3, 7],
    [3, 9],
    [3, 11],
    [3, 13],
    [3, 15],
    [3, 17],
];

/// The last block of every module in the split the official code trains `arch` with at `k`
/// modules (`config2.py`), where it has a LAM table for it.
pub fn official_module_ends(arch: &ArchSpec, k: usize) -> Option<Vec<[usize; 2]>> {
    official_table(arch, k).map(|t| t.module_ends(arch))
}

fn official_table(arch: &ArchSpec, k: usize) -> Option<&'static OfficialTable> {
    OFFICIAL.iter().find(|t| t.arch == arch.name && t.k == k)
}

impl OfficialTable {
    fn module_ends(&self, arch: &ArchSpec) -> Vec<[usize; 2]> {
        match self.ends {
            OfficialEnds::EveryBlock => arch.blocks().iter().map(|b| b.at.into()).collect(),
            OfficialEnds::List(l) => l.to_vec(),
        }
    }
}

/// The official chains for `arch` split as `split`, by step; `None` when the official code has
/// no table for that architecture and split.
fn official_chains(arch: &ArchSpec, split: &Split) -> Option<Vec<Vec<BlockRef>>> {
    let k = split.k();
    let t = official_table(arch, k)?;
    let blocks = arch.blocks();
    let ends: Vec<[usize; 2]> =
        (0..k).filter_map(|m| split.module_last_block(m)).map(|b| blocks[b].at.into()).collect();
    if ends != t.module_ends(arch) {
        return None;
    }
    let mut by_step = vec![Vec::new(); k];
    for &(first, last, chain) in t.runs {
        for slot in &mut by_step[first..=last] {
            *slot = chain.iter().copied().map(BlockRef::from).collect();
        }
    }
    Some(by_step)
}

/// AugLocal's depth for step `i` of `k` modules, before clamping.
pub fn pyramid_depth(d: usize, c: f64, i: usize, k: usize) -> usize {
    let t = if k > 2 { i as f64 * c / (k - 2) as f64 } else { 0.0 };
    (d as f64 * (1.0 - t) + t).round().max(1.0) as usize
}

/// Chains for every step that has one: steps 1..=K-2 (step 0 has no loss under MLAAN, and
/// module K-1's loss takes no LAM).
pub fn derive_chains(
    arch: &ArchSpec,
    split: &Split,
    cfg: &LamConfig,
) -> Result<Vec<LamChain>, PlanError> {
    let k = split.k();
    let (use_table, official) = match cfg.source.as_str() {
        "auto" => (arch.name == "resnet32", None),
        "rule" => (false, None),
        "official" => {
            let t = official_chains(arch, split).ok_or_else(|| PlanError::InvalidLam {
                module: 0,
                reason: format!(
                    "the official code has no LAM table for {} with this K={k} split (it has \
                     resnet32 K=8 and 15, resnet110 K=32 and 54, each with its own split: \
                     `split = \"mlaan\"`)",
                    arch.name
                ),
            })?;
            (false, Some(t))
        }
        other => {
            return Err(PlanError::InvalidLam {
                module: 0,
                reason: format!("unknown LAM source `{other}` (auto, official or rule)"),
            })
        }
    };
    let blocks = arch.blocks();
    let mut chains = Vec::new();
    for step in 1..k.saturating_sub(1) {
        let end = split.module_last_block(step).expect("modules after 0 hold blocks");
        let table = match &official {
            Some(t) => Some(t[step].clone()),
            None => use_table
                .then(|| resnet32_table(blocks[end].at))
                .flatten()
                .map(|t| t.into_iter().map(BlockRef::from).collect()),
        };
        let chain: Vec<BlockRef> = match table {
            Some(t) => t,
            None => {
                let later = &blocks[end + 1..];
                let transitions: Vec<usize> =
                    (0..later.len()).filter(|&j| later[j].at.index == 0).collect();
                let want = pyramid_depth(cfg.depth, cfg.pyramid, step, k)
                    .clamp(transitions.len().max(1), later.len());
                let fill = want - transitions.len();
                let mut chosen = transitions.clone();
                // Fill from the last stage backward, evenly spaced back from its last block.
                let mut left = fill;
                for stage in (1..=arch.num_stages()).rev() {
                    let rest: Vec<usize> = (0..later.len())
                        .filter(|&j| later[j].at.stage == stage && !transitions.contains(&j))
                        .collect();
                    let take = left.min(rest.len());
                    chosen.extend((0..take).map(|j| rest[rest.len() - 1 - j * rest.len() / take]));
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
                chosen.sort_unstable();
                chosen.dedup();
                chosen.into_iter().map(|j| later[j].at).collect()
            }
        };
        let ema_source_module =
            split.module_of_block(arch.index_of(chain[0]).ok_or_else(|| {
                PlanError::InvalidLam {
                    module: step,
                    reason: format!("chain block {} does not exist", chain[0]),
                }
            })?);
        let c = LamChain { step, blocks: chain, ema_source_module, ema_follows: true };
        validate_chain(arch, split, &c)?;
        chains.push(c);
    }
    Ok(chains)
}

/// A chain must start where module `step` ends (channels and resolution), run through later
/// blocks in order, and end at the last stage's width.
pub fn validate_chain(arch: &ArchSpec, split: &Split, c: &LamChain) -> Result<(), PlanError> {
    let bad = |reason: String| PlanError::InvalidLam { module: c.step, reason };
    let blocks = arch.blocks();
    let end = split.module_last_block(c.step).ok_or_else(|| bad("module has no blocks".into()))?;
    if c.blocks.is_empty() {
        return Err(bad("empty chain".into()));
    }
    let mut channels = blocks[end].out_channels;
    let mut stage = blocks[end].at.stage;
    let mut prev = end;
    for &b in &c.blocks {
        let i = arch.index_of(b).ok_or_else(|| bad(format!("block {b} does not exist")))?;
        if i <= prev {
            return Err(bad(format!("block {b} is not after {}", blocks[prev].at)));
        }
        let info = blocks[i];
        if info.in_channels != channels {
            return Err(bad(format!(
                "block {b} takes {} channels but receives {channels}",
                info.in_channels
            )));
        }
        // Skipping a stage's first block would skip its down-sampling.
        if info.at.stage > stage + 1 || (info.at.stage == stage + 1 && info.at.index != 0) {
            return Err(bad(format!("block {b} skips the first block of stage {}", stage + 1)));
        }
        channels = info.out_channels;
        stage = info.at.stage;
        prev = i;
    }
    if channels != arch.feature_channels() || stage != arch.num_stages() {
        return Err(bad(format!(
            "chain ends with {channels} channels in stage {stage}, not at the last stage's width {}",
            arch.feature_channels()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::SplitSpec;

    /// The official code's chains of `arch` at `k` modules (its own split), by step.
    fn official(arch: &str, k: usize) -> Vec<(usize, String)> {
        let a = ArchSpec::from_name(arch).unwrap();
        let split = Split::resolve(&a, k, &SplitSpec::Named("mlaan".into())).unwrap();
        let cfg = LamConfig { source: "official".into(), ..LamConfig::default() };
        derive_chains(&a, &split, &cfg)
            .unwrap()
            .into_iter()
            .map(|c| {
                let blocks: Vec<String> =
                    c.blocks.iter().map(|b| format!("{},{}", b.stage, b.index)).collect();
                (c.step, blocks.join(" "))
            })
            .collect()
    }

    /// `arch` at `k` has `n` official chains, and those of `steps` are as given.
    fn assert_steps(arch: &str, k: usize, n: usize, steps: &[(usize, &str)]) {
        let got = official(arch, k);
        assert_eq!(got.len(), n, "{arch} K={k}");
        for &(step, want) in steps {
            assert_eq!(got[step - 1], (step, want.to_string()), "{arch} K={k} step {step}");
        }
    }

    #[test]
    fn official_tables_are_the_official_code_s() {
        // Transcribed from configAuxPlus_new.py (InfoPro_Aux) of the official MLAAN code at
        // commit 70effbe, entry j = module j, entries never used there left out.
        let r32_k8: Vec<(usize, String)> = [
            (1, "2,0 3,0 3,2 3,4"),
            (2, "2,0 3,0 3,3 3,4"),
            (3, "3,0 3,2 3,3 3,4"),
            (4, "3,0 3,2 3,3 3,4"),
            (5, "3,2 3,3 3,4"),
            (6, "3,3 3,4"),
        ]
        .map(|(s, c)| (s, c.to_string()))
        .to_vec();
        assert_eq!(official("resnet32", 8), r32_k8);
        assert_steps(
            "resnet32",
            15,
            13,
            &[
                (1, "2,0 3,0 3,2 3,4"),
                (2, "2,0 3,0 3,3 3,4"),
                (3, "2,0 3,0 3,2 3,4"),
                (4, "2,0 3,0 3,3 3,4"),
                (9, "3,0 3,2 3,3 3,4"),
                (10, "3,1 3,2 3,4"),
                (11, "3,2 3,3 3,4"),
                (12, "3,3 3,4"),
                (13, "3,4"),
            ],
        );
        assert_steps(
            "resnet110",
            54,
            52,
            &[
                (1, "2,0 3,0 3,2 3,17"),
                (17, "2,0 3,0 3,2 3,17"),
                (18, "3,0 3,2 3,3 3,17"),
                (34, "3,0 3,2 3,3 3,17"),
                (35, "3,0 3,3 3,4 3,17"),
                (36, "3,8 3,17"),
                (42, "3,8 3,17"),
                (43, "3,14 3,17"),
                (47, "3,15 3,17"),
                (49, "3,16 3,17"),
                (52, "3,17"),
            ],
        );
        assert_steps(
            "resnet110",
            32,
            30,
            &[
                (1, "2,0 3,0 3,2 3,17"),
                (10, "2,0 3,0 3,2 3,17"),
                (11, "3,0 3,2 3,3 3,17"),
                (21, "3,0 3,3 3,4 3,17"),
                (22, "3,8 3,17"),
                (26, "3,14 3,17"),
                (28, "3,15 3,17"),
                (29, "3,16 3,17"),
                (30, "3,17"),
            ],
        );
        // config2.py's ResNet-110 K=32 split.
        let a = ArchSpec::from_name("resnet110").unwrap();
        let split = Split::resolve(&a, 32, &SplitSpec::Named("mlaan".into())).unwrap();
        let ends: Vec<[usize; 2]> = split.ends.iter().map(|&b| b.into()).collect();
        assert_eq!(&ends[..4], &[[1, 1], [1, 2], [1, 4], [1, 5]]);
        assert_eq!(&ends[21..24], &[[2, 17], [3, 1], [3, 3]]);
        // Another split, or an architecture the code has no table for: a clear error.
        let other = Split::resolve(&a, 32, &SplitSpec::Named("even".into())).unwrap();
        let cfg = LamConfig { source: "official".into(), ..LamConfig::default() };
        let e = derive_chains(&a, &other, &cfg).unwrap_err().to_string();
        assert!(e.contains("no LAM table") && e.contains("split = \"mlaan\""), "{e}");
    }

    fn refs(v: &[[usize; 2]]) -> Vec<BlockRef> {
        v.iter().map(|&b| BlockRef::from(b)).collect()
    }

    #[test]
    fn resnet32_k15_equals_method_table() {
        let a = ArchSpec::from_name("resnet32").unwrap();
        let s = Split::resolve(&a, 15, &SplitSpec::Named("every-block".into())).unwrap();
        let chains = derive_chains(&a, &s, &LamConfig::default()).unwrap();
        assert_eq!(chains.len(), 13); // steps 1..=13
        let stage1 = refs(&[[2, 0], [3, 0], [3, 2], [3, 4]]);
        let stage2 = refs(&[[3, 0], [3, 2], [3, 3], [3, 4]]);
        for c in &chains[..4] {
            assert_eq!(c.blocks, stage1, "step {}", c.step);
        }
        for c in &chains[4..9] {
            assert_eq!(c.blocks, stage2, "step {}", c.step);
        }
        assert_eq!(chains[9].blocks, refs(&[[3, 1], [3, 2], [3, 4]]));
        assert_eq!(chains[10].blocks, refs(&[[3, 2], [3, 3], [3, 4]]));
        assert_eq!(chains[11].blocks, refs(&[[3, 3], [3, 4]]));
        assert_eq!(chains[12].blocks, refs(&[[3, 4]]));
        // EMA twin of [2,0] lives in module 5 (one module per block).
        assert_eq!(chains[0].ema_source_module, 5);
        assert_eq!(chains[12].ema_source_module, 14);
    }

    #[test]
    fn rule_reproduces_most_of_the_table() {
        // The rule is the table's pattern; it differs only where the published table is
        // irregular (the module ending at [3,0]).
        let a = ArchSpec::from_name("resnet32").unwrap();
        let s = Split::resolve(&a, 15, &SplitSpec::Named("every-block".into())).unwrap();
        let table = derive_chains(&a, &s, &LamConfig::default()).unwrap();
        let cfg = LamConfig { source: "rule".into(), depth: 4, pyramid: 0.2 };
        let rule = derive_chains(&a, &s, &cfg).unwrap();
        let differ: Vec<usize> = table
            .iter()
            .zip(&rule)
            .filter(|(t, r)| t.blocks != r.blocks)
            .map(|(t, _)| t.step)
            .collect();
        assert_eq!(differ, vec![10], "{rule:#?}");
    }

    #[test]
    fn rule_gives_valid_chains_for_every_arch_and_split() {
        for (arch, ks) in [
            ("resnet110", vec![2, 4, 8, 16, 54]),
            ("resnet34", vec![2, 4, 16]),
            ("resnet101", vec![4, 33]),
            ("resnet20", vec![3, 9]),
        ] {
            let a = ArchSpec::from_name(arch).unwrap();
            for k in ks {
                let s = Split::resolve(&a, k, &SplitSpec::Named("auto".into())).unwrap();
                let chains = derive_chains(&a, &s, &LamConfig::default()).unwrap();
                assert_eq!(chains.len(), k.saturating_sub(2), "{arch} K={k}");
                for c in &chains {
                    assert!(c.blocks.len() <= 4, "{arch} K={k} step {}", c.step);
                    assert_eq!(c.blocks.last().unwrap().stage, a.num_stages(), "{arch} K={k}");
                    assert!(c.ema_source_module > c.step, "twin source must be a later module");
                }
            }
        }
    }

    #[test]
    fn pyramid_depth_shrinks() {
        assert_eq!(pyramid_depth(4, 1.0, 0, 10), 4);
        assert_eq!(pyramid_depth(4, 1.0, 8, 10), 1);
        assert_eq!(pyramid_depth(4, 0.0, 8, 10), 4);
    }

    #[test]
    fn broken_chain_is_rejected_with_the_block() {
        let a = ArchSpec::from_name("resnet32").unwrap();
        let s = Split::resolve(&a, 4, &SplitSpec::Named("infopro".into())).unwrap();
        let c = LamChain {
            step: 1,
            blocks: refs(&[[3, 2], [3, 4]]),
            ema_source_module: 3,
            ema_follows: true,
        };
        let e = validate_chain(&a, &s, &c).unwrap_err().to_string();
        assert!(e.contains("[3,2]"), "{e}");
    }
}

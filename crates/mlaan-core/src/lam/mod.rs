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
//!
//! The tables are data in `tables`; this module holds the chain type, the rule and the check
//! every chain passes.

mod tables;

pub use tables::official_module_ends;

use crate::arch::{ArchSpec, BlockRef};
use crate::error::PlanError;
use crate::split::Split;
use serde::{Deserialize, Serialize};
use tables::{official_chains, resnet32_table};

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
            ("vit-tiny-p4", vec![2, 4, 6, 12]),
            ("vgg13-cifar", vec![4, 10]),
            ("vgg16", vec![4, 13]),
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
    fn vit_chains_take_evenly_spaced_later_blocks() {
        // One stage of equal blocks: no width change to cross, the chain samples later blocks
        // back from the last one, shorter toward the output.
        let a = ArchSpec::from_name("vit-tiny-p4").unwrap();
        let s = Split::resolve(&a, 4, &SplitSpec::Named("auto".into())).unwrap();
        let chains = derive_chains(&a, &s, &LamConfig::default()).unwrap();
        let got: Vec<Vec<BlockRef>> = chains.iter().map(|c| c.blocks.clone()).collect();
        assert_eq!(got, [refs(&[[1, 7], [1, 9], [1, 11]]), refs(&[[1, 9], [1, 10], [1, 11]])]);
        assert_eq!((chains[0].ema_source_module, chains[1].ema_source_module), (2, 3));
        // VGG: every later stage's first layer (its max-pool) is in the chain.
        let g = ArchSpec::from_name("vgg13-cifar").unwrap();
        let s = Split::resolve(&g, 4, &SplitSpec::Named("auto".into())).unwrap();
        let chains = derive_chains(&g, &s, &LamConfig::default()).unwrap();
        assert_eq!(chains[0].blocks, refs(&[[4, 0], [5, 0], [5, 1]]));
        assert_eq!(chains[1].blocks, refs(&[[5, 0], [5, 1]]));
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

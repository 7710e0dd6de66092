//! Splitting a backbone into K gradient-isolated modules.
//!
//! A split is the list of units (blocks of a ResNet or a ViT, conv layers of a VGG) that end
//! modules 0..K-2 (module K-1 always ends at the last unit). `[0,0]` means "after the stem":
//! module 0 is then the stem alone (a ResNet's stem, a ViT's embedding; a VGG has none).
//! Module 0 always holds the stem; module K-1 always holds the final classifier.

use crate::arch::{ArchSpec, BlockRef};
use crate::error::PlanError;
use serde::{Deserialize, Serialize};

/// How the split is chosen in a config: a named rule or the ends written out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SplitSpec {
    /// `auto`, `infopro`, `infopro-balanced`, `mlaan`, `every-block`, `per-layer`, `even`.
    Named(String),
    /// The end block of modules 0..K-2, e.g. `[[1,2],[2,1],[3,0]]`.
    Ends(Vec<BlockRef>),
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec::Named("auto".into())
    }
}

/// A validated split of an architecture into K modules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Split {
    /// End block of modules 0..K-2.
    pub ends: Vec<BlockRef>,
    /// Where it came from, for `plan` (e.g. "InfoPro table").
    pub source: String,
    /// Forward index of the last block of every module (module 0 = stem only: `None`).
    #[serde(skip)]
    last_block: Vec<Option<usize>>,
}

/// InfoPro's split tables (networks/configs.py of InfoPro-Pytorch), CIFAR ResNets.
fn infopro_table(arch: &str, k: usize) -> Option<Vec<[usize; 2]>> {
    Some(match (arch, k) {
        ("resnet32", 2) => vec![[2, 1]],
        ("resnet32", 4) => vec![[1, 2], [2, 1], [3, 0]],
        ("resnet32", 8) => vec![[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        ("resnet32", 16) => {
            let mut v = vec![[0, 0]];
            for s in 1..=3 {
                for i in 0..5 {
                    if (s, i) != (3, 4) {
                        v.push([s, i]);
                    }
                }
            }
            v
        }
        ("resnet110", 2) => vec![[2, 8]],
        ("resnet110", 4) => vec![[1, 11], [2, 7], [3, 3]],
        ("resnet110", 8) => vec![[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        ("resnet110", 16) => vec![
            [1, 1],
            [1, 4],
            [1, 7],
            [1, 10],
            [1, 13],
            [1, 16],
            [2, 1],
            [2, 4],
            [2, 7],
            [2, 11],
            [2, 15],
            [3, 1],
            [3, 5],
            [3, 9],
            [3, 13],
        ],
        _ => return None,
    })
}

/// InfoPro*'s balanced-memory splits (ResNet-110, CIFAR-10).
fn infopro_balanced_table(arch: &str, k: usize) -> Option<Vec<[usize; 2]>> {
    Some(match (arch, k) {
        ("resnet110", 2) => vec![[1, 14]],
        ("resnet110", 3) => vec![[1, 9], [2, 2]],
        ("resnet110", 4) => vec![[1, 6], [1, 14], [2, 8]],
        _ => return None,
    })
}

impl Split {
    /// Validate explicit module ends against the architecture.
    pub fn from_ends(
        arch: &ArchSpec,
        ends: Vec<BlockRef>,
        source: &str,
    ) -> Result<Split, PlanError> {
        let bad = |reason: String| PlanError::InvalidSplit { arch: arch.name.clone(), reason };
        let n = arch.num_blocks();
        let stem = usize::from(arch.has_stem());
        if ends.len() + 1 > n + stem {
            return Err(bad(format!(
                "K={} modules but {} has only {} blocks (at most K={}{})",
                ends.len() + 1,
                arch.name,
                n,
                n + stem,
                if stem == 1 { " with [0,0]" } else { "" }
            )));
        }
        let mut last_block = Vec::with_capacity(ends.len() + 1);
        let mut prev: Option<usize> = None;
        for (m, &e) in ends.iter().enumerate() {
            let idx = if e.is_stem() {
                if e.index != 0 {
                    return Err(bad(format!("module {m} ends at {e}: the stem is [0,0]")));
                }
                if m != 0 {
                    return Err(bad(format!(
                        "module {m} ends at [0,0] (after the stem); only module 0 may"
                    )));
                }
                if !arch.has_stem() {
                    return Err(bad(format!(
                        "module 0 ends at [0,0], after the stem, but {} has no stem: its \
                         first module starts with the first conv layer [1,0]",
                        arch.name
                    )));
                }
                None
            } else {
                let i = arch.index_of(e).ok_or_else(|| {
                    bad(format!(
                        "module {m} ends at {e}, which does not exist (stages 1..={} of sizes {:?}, indices from 0)",
                        arch.num_stages(),
                        arch.depths()
                    ))
                })?;
                if let Some(p) = prev {
                    if i <= p {
                        return Err(bad(format!(
                            "module {m} ends at {e}, not after module {}'s end {}: ends must increase",
                            m - 1,
                            ends[m - 1]
                        )));
                    }
                }
                if i == n - 1 {
                    return Err(bad(format!(
                        "module {m} ends at {e}, the last block, leaving module {} empty",
                        ends.len()
                    )));
                }
                Some(i)
            };
            if idx.is_some() {
                prev = idx;
            }
            last_block.push(idx);
        }
        last_block.push(Some(n - 1));
        Ok(Split { ends, source: source.to_string(), last_block })
    }

    /// Resolve a config's split for K modules.
    pub fn resolve(arch: &ArchSpec, k: usize, spec: &SplitSpec) -> Result<Split, PlanError> {
        let bad = |reason: String| PlanError::InvalidSplit { arch: arch.name.clone(), reason };
        if k == 0 {
            return Err(bad("K must be at least 1".into()));
        }
        if k == 1 && matches!(spec, SplitSpec::Named(_)) {
            // One module is the whole network, whatever rule would cut it.
            return Ok(Split::whole(arch));
        }
        let to_refs = |v: Vec<[usize; 2]>| v.into_iter().map(BlockRef::from).collect::<Vec<_>>();
        let n = arch.num_blocks();
        match spec {
            SplitSpec::Ends(ends) => {
                if ends.len() + 1 != k {
                    return Err(bad(format!(
                        "the split lists {} module ends, so K={}, but K={k} was asked for",
                        ends.len(),
                        ends.len() + 1
                    )));
                }
                Split::from_ends(arch, ends.clone(), "config")
            }
            SplitSpec::Named(name) => match name.as_str() {
                "infopro" => {
                    let t = infopro_table(&arch.name, k).ok_or_else(|| {
                        bad(format!("InfoPro's table has no split for K={k} (it has resnet32/resnet110 with K=2,4,8,16)"))
                    })?;
                    Split::from_ends(arch, to_refs(t), "InfoPro table")
                }
                "mlaan" => {
                    let ends = crate::lam::official_module_ends(arch, k)
                        .ok_or_else(|| {
                            bad(format!("the official MLAAN code has no split for K={k} (it has resnet32 with K=8,15 and resnet110 with K=32,54)"))
                        })?;
                    Split::from_ends(arch, to_refs(ends[..ends.len() - 1].to_vec()), "MLAAN code table")
                }
                "infopro-balanced" => {
                    let t = infopro_balanced_table(&arch.name, k).ok_or_else(|| {
                        bad(format!("InfoPro*'s balanced table has no split for K={k} (it has resnet110 with K=2,3,4)"))
                    })?;
                    Split::from_ends(arch, to_refs(t), "InfoPro* balanced table")
                }
                "every-block" => {
                    if k != n {
                        return Err(bad(format!(
                            "every-block gives K={n} for {} but K={k} was asked for",
                            arch.name
                        )));
                    }
                    Split::from_ends(arch, Split::even_ends(arch, k), "one module per block")
                }
                "per-layer" => {
                    // The stem (where there is one) its own module, then one module per unit;
                    // the last takes every unit left (AugLocal's official split: K layers'
                    // worth of modules less the auxiliary depth).
                    let stem = arch.has_stem().then(|| BlockRef::new(0, 0));
                    let layers = n + usize::from(stem.is_some());
                    if k > layers {
                        return Err(bad(format!(
                            "per-layer gives at most K={layers} for {} ({}{n} units) but K={k} \
                             was asked for",
                            arch.name,
                            if stem.is_some() { "the stem and " } else { "" },
                        )));
                    }
                    let blocks = arch.blocks();
                    let ends =
                        stem.into_iter().chain(blocks.iter().map(|b| b.at)).take(k - 1).collect();
                    let how = if stem.is_some() {
                        "one module per layer, the stem its own"
                    } else {
                        "one module per layer"
                    };
                    Split::from_ends(arch, ends, how)
                }
                "even" => Split::even(arch, k),
                "auto" => {
                    if let Some(t) = infopro_table(&arch.name, k) {
                        Split::from_ends(arch, to_refs(t), "InfoPro table")
                    } else if k == n {
                        Split::from_ends(arch, Split::even_ends(arch, k), "one module per block")
                    } else {
                        Split::even(arch, k)
                    }
                }
                other => Err(bad(format!(
                    "unknown split `{other}` (use auto, infopro, infopro-balanced, mlaan, every-block, per-layer, even, or a list of [stage,index] ends)"
                ))),
            },
        }
    }

    /// Equal numbers of blocks per module (earlier modules take the remainder).
    fn even(arch: &ArchSpec, k: usize) -> Result<Split, PlanError> {
        let n = arch.num_blocks();
        if k > n {
            return Err(PlanError::InvalidSplit {
                arch: arch.name.clone(),
                reason: format!("K={k} modules but {} has only {n} blocks", arch.name),
            });
        }
        Split::from_ends(arch, Split::even_ends(arch, k), "even block counts")
    }

    fn even_ends(arch: &ArchSpec, k: usize) -> Vec<BlockRef> {
        let n = arch.num_blocks();
        let blocks = arch.blocks();
        let (q, r) = (n / k, n % k);
        let mut end = 0usize;
        (0..k - 1)
            .map(|m| {
                end += q + usize::from(m < r);
                blocks[end - 1].at
            })
            .collect()
    }

    /// One module: end-to-end training.
    pub fn whole(arch: &ArchSpec) -> Split {
        Split::from_ends(arch, Vec::new(), "whole network").expect("empty split is valid")
    }

    pub fn k(&self) -> usize {
        self.ends.len() + 1
    }

    /// Forward indices of the blocks of module `m` (may be empty for a stem-only module 0).
    pub fn module_blocks(&self, m: usize) -> std::ops::Range<usize> {
        let start = if m == 0 {
            0
        } else {
            // The first block after the previous module's last block.
            self.last_block[..m].iter().rev().find_map(|b| *b).map_or(0, |b| b + 1)
        };
        let end = self.last_block[m].map_or(start, |b| b + 1);
        start..end
    }

    /// Forward index of the last block of module `m`; `None` when module 0 is the stem alone.
    pub fn module_last_block(&self, m: usize) -> Option<usize> {
        self.last_block[m]
    }

    /// Module that owns forward block `b`.
    pub fn module_of_block(&self, b: usize) -> usize {
        (0..self.k()).find(|&m| self.module_blocks(m).contains(&b)).expect("block in range")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r32() -> ArchSpec {
        ArchSpec::from_name("resnet32").unwrap()
    }

    #[test]
    fn infopro_tables_are_valid_and_cover_all_blocks() {
        for arch in ["resnet32", "resnet110"] {
            let a = ArchSpec::from_name(arch).unwrap();
            for k in [2, 4, 8, 16] {
                let s = Split::resolve(&a, k, &SplitSpec::Named("infopro".into())).unwrap();
                assert_eq!(s.k(), k);
                let covered: usize = (0..k).map(|m| s.module_blocks(m).len()).sum();
                assert_eq!(covered, a.num_blocks(), "{arch} K={k}");
            }
        }
        let a = ArchSpec::from_name("resnet110").unwrap();
        for k in [2, 3, 4] {
            Split::resolve(&a, k, &SplitSpec::Named("infopro-balanced".into())).unwrap();
        }
    }

    #[test]
    fn resnet32_k16_starts_with_stem_only_module() {
        let s = Split::resolve(&r32(), 16, &SplitSpec::Named("infopro".into())).unwrap();
        assert_eq!(s.module_blocks(0), 0..0);
        assert_eq!(s.module_blocks(1), 0..1);
        assert_eq!(s.module_blocks(15), 14..15);
    }

    #[test]
    fn every_block_matches_mlaan_settings() {
        for (arch, k) in [("resnet32", 15), ("resnet110", 54), ("resnet34", 16), ("resnet101", 33)]
        {
            let a = ArchSpec::from_name(arch).unwrap();
            let s = Split::resolve(&a, k, &SplitSpec::Named("every-block".into())).unwrap();
            assert!((0..k).all(|m| s.module_blocks(m).len() == 1), "{arch}");
        }
    }

    #[test]
    fn module_ranges_for_k4() {
        let s = Split::resolve(&r32(), 4, &SplitSpec::Named("infopro".into())).unwrap();
        assert_eq!(s.module_blocks(0), 0..3);
        assert_eq!(s.module_blocks(1), 3..7);
        assert_eq!(s.module_blocks(2), 7..11);
        assert_eq!(s.module_blocks(3), 11..15);
        assert_eq!(s.module_of_block(7), 2);
    }

    #[test]
    fn invalid_splits_name_the_numbers() {
        let a = r32();
        let e = Split::from_ends(&a, vec![BlockRef::new(2, 1), BlockRef::new(1, 3)], "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1,3]") && e.contains("[2,1]"), "{e}");
        let e = Split::from_ends(&a, vec![BlockRef::new(4, 0)], "t").unwrap_err().to_string();
        assert!(e.contains("[4,0]") && e.contains("does not exist"), "{e}");
        let e = Split::from_ends(&a, vec![BlockRef::new(3, 4)], "t").unwrap_err().to_string();
        assert!(e.contains("last block"), "{e}");
        let e = Split::resolve(&a, 3, &SplitSpec::Ends(vec![BlockRef::new(1, 1)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("K=2") && e.contains("K=3"), "{e}");
        let e = Split::resolve(&a, 99, &SplitSpec::Named("auto".into())).unwrap_err().to_string();
        assert!(e.contains("K=99") && e.contains("15 blocks"), "{e}");
        let e = Split::resolve(&a, 3, &SplitSpec::Named("infopro".into())).unwrap_err().to_string();
        assert!(e.contains("K=3"), "{e}");
        let e = Split::resolve(&a, 3, &SplitSpec::Named("zigzag".into())).unwrap_err().to_string();
        assert!(e.contains("zigzag"), "{e}");
    }

    #[test]
    fn vit_and_vgg_splits_count_blocks_and_conv_layers() {
        let v = ArchSpec::from_name("vit-tiny-p4").unwrap();
        let s = Split::resolve(&v, 4, &SplitSpec::Named("auto".into())).unwrap();
        assert_eq!(s.source, "even block counts");
        assert_eq!(
            (0..4).map(|m| s.module_blocks(m)).collect::<Vec<_>>(),
            [0..3, 3..6, 6..9, 9..12]
        );
        // The embedding alone as module 0 is allowed, as a ResNet's stem is.
        Split::from_ends(&v, vec![BlockRef::STEM, BlockRef::new(1, 5)], "t").unwrap();
        let g = ArchSpec::from_name("vgg13-cifar").unwrap();
        let s = Split::resolve(&g, 4, &SplitSpec::Named("auto".into())).unwrap();
        assert_eq!(s.ends, [BlockRef::new(2, 0), BlockRef::new(3, 1), BlockRef::new(4, 1)]);
        let e = Split::from_ends(&g, vec![BlockRef::STEM], "t").unwrap_err().to_string();
        assert!(e.contains("vgg13-cifar has no stem"), "{e}");
        let e = Split::resolve(&g, 11, &SplitSpec::Named("auto".into())).unwrap_err().to_string();
        assert!(e.contains("K=11") && e.contains("10 blocks"), "{e}");
    }

    #[test]
    fn even_split_balances_block_counts() {
        let s = Split::resolve(&r32(), 3, &SplitSpec::Named("auto".into())).unwrap();
        assert_eq!(s.source, "even block counts");
        assert_eq!((0..3).map(|m| s.module_blocks(m).len()).collect::<Vec<_>>(), vec![5, 5, 5]);
        let whole = Split::whole(&r32());
        assert_eq!(whole.k(), 1);
        assert_eq!(whole.module_blocks(0), 0..15);
    }
}

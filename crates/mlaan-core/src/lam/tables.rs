//! LAM chains written down as data: MLAAN's ResNet-32 table (docs/method.md §4) and the
//! official MLAAN code's tables (`configAuxPlus_new.py` at commit 70effbe) with the splits
//! they were made for. `derive_chains` reads them; the rule for everything else is in the
//! parent module.

use crate::arch::{ArchSpec, BlockRef};
use crate::split::Split;

/// MLAAN's ResNet-32 chains, keyed by the block that ends the module.
pub(super) fn resnet32_table(end: BlockRef) -> Option<Vec<[usize; 2]>> {
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
pub(super) fn official_chains(arch: &ArchSpec, split: &Split) -> Option<Vec<Vec<BlockRef>>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lam::{derive_chains, LamConfig};
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
}

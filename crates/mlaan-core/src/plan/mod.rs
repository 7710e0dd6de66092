//! The network plan: what every local module owns and which losses train it, derived from the
//! config. This is the single place where docs/method.md's gradient routes are written down:
//! every loss term carries a `reach`, the number of earlier modules its gradient reaches.
//!
//! | method | module 0 | module i (0 < i < K-1) | module K-1 |
//! |---|---|---|---|
//! | e2e | — | — | CE(fc), reach K-1 |
//! | dgl | CE(head) | CE(head) | CE(fc) |
//! | infopro | λ1·BCE + λ2·L_cls | λ1·BCE + λ2·L_cls | CE(fc) |
//! | auglocal | CE(aux net) | CE(aux net) | CE(fc) |
//! | mlaan-* | — (only the cascade of later steps) | w_ind·base + w_casc·base(LAM), reach d-1 | CE(fc), reach d-1 |
//!
//! Under `mlaan-auglocal` the base is AugLocal's auxiliary network; its cascade runs the LAM
//! chain and a classifier head (`method.auglocal.cascade = "lam"`) or, in the chain's place,
//! the step's own AugLocal network (`"auxiliary"`).

use crate::arch::{ArchSpec, BlockInfo, Chw};
use crate::auglocal::{aux_nets, AuxNetSpec};
use crate::config::{AugLocalCascade, EmaUpdate, HeadKind, InfoProMode, Method, RunConfig};
use crate::error::PlanError;
use crate::lam::{derive_chains, LamChain};
use crate::split::Split;
use serde::Serialize;

/// Which of a module's losses a term is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TermKind {
    /// The base method's local loss on h_i (input detached).
    Independent,
    /// MLAAN's cascade loss: LAM chain then head, reaching earlier modules.
    Cascade,
    /// Cross-entropy of the backbone's final classifier (module K-1).
    Final,
}

impl TermKind {
    /// The name `plan` prints and TensorBoard tags use (`loss/module3/cascade`).
    pub fn name(self) -> &'static str {
        match self {
            TermKind::Independent => "independent",
            TermKind::Cascade => "cascade",
            TermKind::Final => "final",
        }
    }
}

/// What a loss term computes from its input feature map.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ObjectiveSpec {
    /// Cross-entropy of a classifier head.
    Classify { head: HeadKind, in_channels: usize },
    /// InfoPro: λ1·BCE(decoder(h), x_raw) + λ2·L_cls(head(h)).
    InfoPro {
        head: HeadKind,
        in_channels: usize,
        lambda1: f64,
        lambda2: f64,
        mode: InfoProMode,
        temperature: f64,
    },
    /// AugLocal: cross-entropy of a network of fresh blocks shaped like later layers.
    AugLocal(AuxNetSpec),
    /// The backbone's own classifier (`fc`).
    FinalClassifier,
}

/// A LAM chain resolved to block shapes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LamSpec {
    #[serde(skip)]
    pub blocks: Vec<BlockInfo>,
    pub chain: LamChain,
}

/// One weighted loss of a module and how far back its gradient goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TermSpec {
    pub kind: TermKind,
    pub weight: f64,
    /// Number of earlier modules the gradient reaches (0 = this module only).
    pub reach: usize,
    pub lam: Option<LamSpec>,
    pub objective: ObjectiveSpec,
}

/// Everything one local module owns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleSpec {
    pub index: usize,
    pub with_stem: bool,
    #[serde(skip)]
    pub blocks: Vec<BlockInfo>,
    pub block_refs: Vec<crate::arch::BlockRef>,
    pub with_classifier: bool,
    pub terms: Vec<TermSpec>,
    /// Shape of h_i for one sample.
    pub output: Chw,
}

/// Image facts the networks are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ImageSpec {
    pub channels: usize,
    /// Height and width.
    pub size: [usize; 2],
    pub classes: usize,
}

impl ImageSpec {
    /// One sample's input shape.
    pub fn chw(&self) -> Chw {
        Chw { c: self.channels, h: self.size[0], w: self.size[1] }
    }
}

/// The whole network: architecture, split, LAM chains and per-module specs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkPlan {
    pub arch: ArchSpec,
    pub split: Split,
    pub method: Method,
    /// The auxiliary heads' kind (`method.head`, or the backbone's default).
    pub head: HeadKind,
    pub input: Chw,
    pub num_classes: usize,
    pub chains: Vec<LamChain>,
    pub modules: Vec<ModuleSpec>,
}

impl NetworkPlan {
    /// Derive the plan for `cfg` on images of shape `input` with `num_classes` classes.
    pub fn new(cfg: &RunConfig, input: Chw, num_classes: usize) -> Result<NetworkPlan, PlanError> {
        let arch = ArchSpec::from_name(&cfg.model.arch)?;
        arch.check_input(input)?;
        let split = Split::resolve(&arch, cfg.model.k, &cfg.model.split)?;
        let k = split.k();
        let m = &cfg.method;
        let method = m.name;
        // The first step with a loss of its own: 1, or d − 1 when steps whose cascade cannot
        // reach d modules get none (the official code).
        let first_loss = if m.early_cascades { 1 } else { m.cascade_depth.max(2) - 1 };
        // MLAAN on AugLocal may put the step's AugLocal network where the LAM chain goes.
        let cascade_lam = method.is_mlaan()
            && !(method.uses_auglocal_net() && m.auglocal.cascade == AugLocalCascade::Auxiliary);
        let mut chains =
            if cascade_lam { derive_chains(&arch, &split, &m.lam)? } else { Vec::new() };
        let aug_nets = if method.uses_auglocal_net() {
            aux_nets(&arch, &split, m.auglocal.depth, m.auglocal.pyramid)
        } else {
            Vec::new()
        };
        chains.retain(|c| c.step >= first_loss);
        let last_step = chains.iter().map(|c| c.step).max();
        for c in &mut chains {
            c.ema_follows = match m.ema_update {
                EmaUpdate::All => true,
                EmaUpdate::Last => Some(c.step) == last_step,
                EmaUpdate::None => false,
            };
        }
        let mut blocks = arch.blocks();
        if !arch.has_stem() {
            // Without a stem the first unit reads the image itself.
            blocks[0].in_channels = input.c;
        }
        let outputs = arch.block_outputs(input);
        let head = m.head_for(&arch);
        let base_in = |mode: InfoProMode, i: usize, in_channels: usize| -> ObjectiveSpec {
            if method.uses_infopro_loss() {
                let (lambda1, lambda2) = m.lambdas(i, k);
                ObjectiveSpec::InfoPro {
                    head,
                    in_channels,
                    lambda1,
                    lambda2,
                    mode,
                    temperature: m.contrast_temperature,
                }
            } else {
                ObjectiveSpec::Classify { head, in_channels }
            }
        };
        let base = |i: usize, in_channels: usize| base_in(m.infopro_mode, i, in_channels);
        let independent_mode = m.independent_mode.unwrap_or(m.infopro_mode);
        // The loss of module i on its own output h_i.
        let independent = |i: usize, in_channels: usize| match aug_nets.get(i) {
            Some(net) => ObjectiveSpec::AugLocal(net.clone()),
            None => base_in(independent_mode, i, in_channels),
        };
        let mut modules = Vec::with_capacity(k);
        for i in 0..k {
            let range = split.module_blocks(i);
            let output = match split.module_last_block(i) {
                Some(b) => outputs[b],
                None => arch.stem_output(input),
            };
            let last = i == k - 1;
            let mut terms = Vec::new();
            let final_term = |reach: usize| TermSpec {
                kind: TermKind::Final,
                weight: 1.0,
                reach,
                lam: None,
                objective: ObjectiveSpec::FinalClassifier,
            };
            match method {
                Method::E2e => {
                    if last {
                        terms.push(final_term(i));
                    }
                }
                Method::Dgl | Method::Infopro | Method::Auglocal => terms.push(if last {
                    final_term(0)
                } else {
                    TermSpec {
                        kind: TermKind::Independent,
                        weight: 1.0,
                        reach: 0,
                        lam: None,
                        objective: independent(i, output.c),
                    }
                }),
                Method::MlaanDgl | Method::MlaanInfopro | Method::MlaanAuglocal => {
                    let reach = (m.cascade_depth - 1).min(i);
                    if last {
                        terms.push(final_term(reach));
                    } else if i >= first_loss {
                        terms.push(TermSpec {
                            kind: TermKind::Independent,
                            weight: m.w_ind,
                            reach: 0,
                            lam: None,
                            objective: independent(i, output.c),
                        });
                        let (lam, objective) = if cascade_lam {
                            let chain = chains
                                .iter()
                                .find(|c| c.step == i)
                                .cloned()
                                .expect("a chain for every step 1..K-2");
                            let lam_blocks = chain
                                .blocks
                                .iter()
                                .map(|b| blocks[arch.index_of(*b).expect("validated chain")])
                                .collect();
                            // After the chain: the base method's head on the last features
                            // (AugLocal's own network reads h_i, so a plain classifier here).
                            let objective = if method.uses_auglocal_net() {
                                ObjectiveSpec::Classify {
                                    head,
                                    in_channels: arch.feature_channels(),
                                }
                            } else {
                                base(i, arch.feature_channels())
                            };
                            (Some(LamSpec { blocks: lam_blocks, chain }), objective)
                        } else {
                            // The step's AugLocal network, as its independent loss has.
                            (None, independent(i, output.c))
                        };
                        terms.push(TermSpec {
                            kind: TermKind::Cascade,
                            weight: m.w_casc,
                            reach,
                            lam,
                            objective,
                        });
                    }
                }
            }
            // GPipe (`pipeline.micro_batches = M`) accumulates micro-batch gradients: each
            // micro-batch's mean loss weighs 1/M, so that the step is the whole mini-batch's.
            for t in &mut terms {
                t.weight /= cfg.pipeline.micro_batches.max(1) as f64;
            }
            modules.push(ModuleSpec {
                index: i,
                with_stem: i == 0 && arch.has_stem(),
                blocks: blocks[range.clone()].to_vec(),
                block_refs: blocks[range].iter().map(|b| b.at).collect(),
                with_classifier: last,
                terms,
                output,
            });
        }
        Ok(NetworkPlan { arch, split, method, head, input, num_classes, chains, modules })
    }

    pub fn k(&self) -> usize {
        self.modules.len()
    }

    /// The shape of module `m`'s output for a batch of `batch`: (N, C, H, W) for a feature
    /// map, (N, T, D) for a ViT's tokens.
    pub fn output_shape(&self, m: usize, batch: usize) -> Vec<i64> {
        let o = self.modules[m].output;
        let n = batch as i64;
        if self.arch.vit().is_some() {
            vec![n, o.h as i64, o.c as i64]
        } else {
            vec![n, o.c as i64, o.h as i64, o.w as i64]
        }
    }

    /// The largest reach of any term: how many hops a gradient message may travel.
    pub fn max_reach(&self) -> usize {
        self.modules.iter().flat_map(|m| m.terms.iter().map(|t| t.reach)).max().unwrap_or(0)
    }

    /// Backbone multiply-accumulates per sample of each module (placement fallback cost).
    pub fn module_macs(&self) -> Vec<f64> {
        let blocks = self.arch.blocks();
        let mut shapes = vec![self.arch.stem_output(self.input)];
        shapes.extend(self.arch.block_outputs(self.input));
        self.modules
            .iter()
            .map(|m| {
                let stem = if m.with_stem { self.arch.stem_macs(self.input) as f64 } else { 0.0 };
                let body: f64 = m
                    .blocks
                    .iter()
                    .map(|b| {
                        let i = self.arch.index_of(b.at).unwrap();
                        self.arch.block_macs(&blocks[i], shapes[i]) as f64
                    })
                    .sum();
                stem + body
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;

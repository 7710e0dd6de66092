//! Everything one local module owns, built from its `ModuleSpec`: the backbone slice, the
//! classifier (last module), and one network per loss term (auxiliary head, InfoPro decoder,
//! LAM chain with its EMA twin).
//!
//! Names: backbone parameters sit at the store root under the backbone's published names
//! (torchvision's, timm's); term networks under `aux.<term>.*`; EMA twins in a separate frozen
//! store under the real unit's names.

use crate::backbone::{BackbonePart, Classifier};
use crate::heads::{Decoder, Head};
use crate::lam::Lam;
use crate::layers::Mode;
use crate::losses;
use mlaan_core::arch::{ArchSpec, Chw};
use mlaan_core::config::InfoProMode;
use mlaan_core::plan::{ModuleSpec, ObjectiveSpec, TermKind, TermSpec};
use tch::{nn, Device, Tensor};

/// Labels and, for InfoPro, the un-normalised image in [0,1].
pub struct Targets<'a> {
    pub labels: &'a Tensor,
    pub image: Option<&'a Tensor>,
}

/// The computation of one loss term after its (optional) LAM chain.
#[derive(Debug)]
pub enum Objective {
    Classify(Head),
    InfoPro {
        decoder: Decoder,
        head: Head,
        lambda1: f64,
        lambda2: f64,
        contrast: Option<f64>,
    },
    /// The module's own final classifier.
    Final,
}

/// One weighted loss of a module.
#[derive(Debug)]
pub struct Term {
    pub spec: TermSpec,
    pub lam: Option<Lam>,
    pub objective: Objective,
    /// Store prefixes of this term's networks (`aux.independent`, `aux.cascade`, or the
    /// backbone classifier's: `fc`; `norm` and `head`; `classifier`).
    pub prefixes: Vec<String>,
}

/// The unweighted loss of a term and its class scores when it has them.
pub struct TermOutput {
    pub loss: Tensor,
    pub logits: Option<Tensor>,
}

/// What one local module owns.
#[derive(Debug)]
pub struct LocalNets {
    pub index: usize,
    pub vs: nn::VarStore,
    /// Frozen store of EMA twins (empty unless MLAAN).
    pub ema_vs: nn::VarStore,
    pub backbone: BackbonePart,
    pub classifier: Option<Classifier>,
    pub terms: Vec<Term>,
}

fn term_prefixes(kind: TermKind, arch: &ArchSpec) -> Vec<String> {
    match kind {
        TermKind::Independent => vec!["aux.independent".into()],
        TermKind::Cascade => vec!["aux.cascade".into()],
        TermKind::Final => Classifier::prefixes(arch).iter().map(|p| p.to_string()).collect(),
    }
}

impl LocalNets {
    /// Build module `spec` of a network with `arch`, on `device`, with freshly initialised
    /// weights (the caller overwrites them with the shared initial state).
    pub fn new(
        arch: &ArchSpec,
        spec: &ModuleSpec,
        image_channels: usize,
        image_size: [usize; 2],
        num_classes: usize,
        device: Device,
    ) -> Self {
        let vs = nn::VarStore::new(device);
        let mut ema_vs = nn::VarStore::new(device);
        let root = vs.root();
        let image = Chw { c: image_channels, h: image_size[0], w: image_size[1] };
        let backbone = BackbonePart::new(&root, arch, image, spec.with_stem, &spec.blocks);
        let classifier = spec.with_classifier.then(|| Classifier::new(&root, arch, num_classes));
        let terms = spec
            .terms
            .iter()
            .map(|t| {
                let prefixes = term_prefixes(t.kind, arch);
                let p = crate::backbone::path_of(&root, &prefixes[0]);
                let lam = t.lam.as_ref().map(|l| Lam::new(&p, &ema_vs.root(), arch, &l.blocks));
                let objective = match &t.objective {
                    ObjectiveSpec::FinalClassifier => Objective::Final,
                    ObjectiveSpec::Classify { head, in_channels } => Objective::Classify(
                        Head::new(&(&p / "head"), *head, *in_channels, num_classes),
                    ),
                    ObjectiveSpec::AugLocal(net) => {
                        Objective::Classify(Head::aux_net(&(&p / "net"), arch, net, num_classes))
                    }
                    ObjectiveSpec::InfoPro {
                        head,
                        in_channels,
                        lambda1,
                        lambda2,
                        mode,
                        temperature,
                    } => {
                        let contrast = (*mode == InfoProMode::Contrast).then_some(*temperature);
                        let out = if contrast.is_some() { 128 } else { num_classes };
                        let decoder = match arch.vit() {
                            Some(v) => Decoder::patches(
                                &(&p / "decoder"),
                                *in_channels,
                                image_channels,
                                image_size,
                                v.patch,
                            ),
                            None => Decoder::new(
                                &(&p / "decoder"),
                                *in_channels,
                                image_channels,
                                image_size,
                            ),
                        };
                        Objective::InfoPro {
                            decoder,
                            head: Head::new(&(&p / "head"), *head, *in_channels, out),
                            lambda1: *lambda1,
                            lambda2: *lambda2,
                            contrast,
                        }
                    }
                };
                Term { spec: t.clone(), lam, objective, prefixes }
            })
            .collect();
        ema_vs.freeze();
        LocalNets { index: spec.index, vs, ema_vs, backbone, classifier, terms }
    }

    /// h_i from the module's input.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        self.backbone.forward(x, mode)
    }

    /// The unweighted loss of term `t` on `h` (its LAM first, if any).
    pub fn term_loss(&self, t: usize, h: &Tensor, targets: &Targets, mode: Mode) -> TermOutput {
        let term = &self.terms[t];
        let z = match &term.lam {
            Some(lam) => lam.forward(h, mode),
            None => h.shallow_clone(),
        };
        match &term.objective {
            Objective::Final => {
                let logits = self.classifier.as_ref().expect("last module has fc").forward(&z);
                TermOutput {
                    loss: losses::cross_entropy(&logits, targets.labels),
                    logits: Some(logits),
                }
            }
            Objective::Classify(head) => {
                let logits = head.forward(&z, mode);
                TermOutput {
                    loss: losses::cross_entropy(&logits, targets.labels),
                    logits: Some(logits),
                }
            }
            Objective::InfoPro { decoder, head, lambda1, lambda2, contrast } => {
                let image = targets.image.expect("InfoPro needs the raw image");
                let bce = losses::reconstruction_bce(&decoder.forward(&z, mode), image);
                let out = head.forward(&z, mode);
                let (cls, logits) = match contrast {
                    Some(t) => (losses::supervised_contrastive(&out, targets.labels, *t), None),
                    None => (losses::cross_entropy(&out, targets.labels), Some(out)),
                };
                TermOutput { loss: bce * *lambda1 + cls * *lambda2, logits }
            }
        }
    }

    /// Class scores of the module's diagnostic head: the independent head (or the final
    /// classifier) in evaluation mode; `None` when the module has no classifying head.
    pub fn probe_logits(&self, h: &Tensor) -> Option<Tensor> {
        if let Some(c) = &self.classifier {
            return Some(c.forward(h));
        }
        self.terms.iter().find(|t| t.spec.kind == TermKind::Independent).and_then(|t| {
            match &t.objective {
                Objective::Classify(head) => Some(head.forward(h, Mode::Eval)),
                Objective::InfoPro { head, contrast: None, .. } => {
                    Some(head.forward(h, Mode::Eval))
                }
                _ => None,
            }
        })
    }

    /// Trainable parameters of the backbone slice and classifier, by name.
    pub fn backbone_params(&self) -> Vec<(String, Tensor)> {
        self.named_trainable(|n| !n.starts_with("aux."))
    }

    /// Trainable parameters of term `t`'s own networks (head, decoder, LAM copies; for the
    /// final term, the classifier).
    pub fn term_params(&self, t: usize) -> Vec<(String, Tensor)> {
        let prefixes: Vec<String> =
            self.terms[t].prefixes.iter().map(|p| format!("{p}.")).collect();
        self.named_trainable(|n| prefixes.iter().any(|p| n.starts_with(p)))
    }

    /// Trainable parameters by name, sorted for a stable order.
    pub fn named_trainable(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().filter(|(n, t)| t.requires_grad() && keep(n)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every tensor the module's stores hold (parameters and buffers), by name; EMA twins are
    /// prefixed `ema.`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.extend(self.ema_vs.variables().into_iter().map(|(n, t)| (format!("ema.{n}"), t)));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of elements of parameters whose name satisfies `keep` (for `plan`).
    pub fn count_params(&self, keep: impl Fn(&str) -> bool) -> usize {
        self.named_trainable(keep).iter().map(|(_, t)| t.numel()).sum()
    }

    pub fn ema_param_count(&self) -> usize {
        self.ema_vs
            .variables()
            .iter()
            .filter(|(n, _)| !n.contains("running_"))
            .map(|(_, t)| t.numel())
            .sum()
    }
}

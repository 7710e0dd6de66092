//! `[method]`: the training method (end-to-end, DGL, InfoPro, AugLocal, or MLAAN on any of the
//! three) and its losses, heads, auxiliary networks, EMA twins and LAM chains.

use super::{bad_value, is_positive, Schedule};
use crate::arch::ArchSpec;
use crate::error::ConfigError;
use crate::lam::LamConfig;
use serde::{Deserialize, Serialize};

/// The training method (docs/method.md §3–4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    E2e,
    Dgl,
    Infopro,
    Auglocal,
    MlaanDgl,
    MlaanInfopro,
    MlaanAuglocal,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::E2e,
        Method::Dgl,
        Method::Infopro,
        Method::Auglocal,
        Method::MlaanDgl,
        Method::MlaanInfopro,
        Method::MlaanAuglocal,
    ];

    pub fn is_mlaan(self) -> bool {
        matches!(self, Method::MlaanDgl | Method::MlaanInfopro | Method::MlaanAuglocal)
    }
    /// InfoPro's local loss (decoder + classifier) is the base objective.
    pub fn uses_infopro_loss(self) -> bool {
        matches!(self, Method::Infopro | Method::MlaanInfopro)
    }
    /// AugLocal's auxiliary network (fresh blocks shaped like later layers) is the base
    /// objective.
    pub fn uses_auglocal_net(self) -> bool {
        matches!(self, Method::Auglocal | Method::MlaanAuglocal)
    }
    pub fn is_local(self) -> bool {
        self != Method::E2e
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::E2e => "e2e",
            Method::Dgl => "dgl",
            Method::Infopro => "infopro",
            Method::Auglocal => "auglocal",
            Method::MlaanDgl => "mlaan-dgl",
            Method::MlaanInfopro => "mlaan-infopro",
            Method::MlaanAuglocal => "mlaan-auglocal",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let known: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            format!("unknown method `{s}` ({})", known.join(", "))
        })
    }
}

/// Which snapshot of its real block an EMA twin folds in after step b (docs/design.md,
/// "Stages and schedules").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmaLagRule {
    /// [`EmaLagRule::Exact`] for sequential, [`EmaLagRule::Distance`] for sync,
    /// [`EmaLagRule::Latest`] for async.
    Auto,
    /// The real block after step b (docs/method.md §4 to the letter; the twin's stage waits
    /// for the source's step).
    Exact,
    /// The real block after step b − (j − i), j the source module, i the twin's: what a
    /// pipeline has at hand without waiting.
    Distance,
    /// Whatever snapshot has arrived.
    Latest,
}

impl EmaLagRule {
    /// The rule `schedule` uses: `auto` resolved, any other rule as it is.
    pub fn resolve(self, schedule: Schedule) -> EmaLagRule {
        match (self, schedule) {
            (EmaLagRule::Auto, Schedule::Sequential) => EmaLagRule::Exact,
            (EmaLagRule::Auto, Schedule::Sync) => EmaLagRule::Distance,
            (EmaLagRule::Auto, Schedule::Async) => EmaLagRule::Latest,
            (rule, _) => rule,
        }
    }
}

/// Which EMA twins follow their real block (MLAAN). The official code differs between its
/// variants: its CIFAR code updates only the last step's twin and leaves the others frozen
/// copies of their block at initialisation; its ImageNet code updates all (docs/method.md §4,
/// docs/method-comparison.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmaUpdate {
    /// Every twin folds in its real block after every step.
    All,
    /// Only the twin of the last step with a LAM chain; the others stay as initialised.
    Last,
    /// No twin moves: each stays the copy of its block at initialisation.
    None,
}

impl EmaUpdate {
    pub fn name(self) -> &'static str {
        match self {
            EmaUpdate::All => "all",
            EmaUpdate::Last => "last",
            EmaUpdate::None => "none",
        }
    }
}

/// Classifier head of a local module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadKind {
    /// Global average pool + linear.
    GapFc,
    /// InfoPro's head: 3x3 conv + BN + ReLU + GAP + FC(128) + ReLU + FC.
    #[serde(rename = "1c2f")]
    OneConvTwoFc,
    /// The DGL paper's deeper head: two 3x3 conv layers, 2x2 average pool, 3-layer MLP.
    Dgl,
    /// For ViTs: LayerNorm, the class token, linear (the form of timm's own classifier).
    ClsFc,
    /// For ViTs: LayerNorm, the mean of the patch tokens (the class token left out), linear.
    MeanFc,
}

impl HeadKind {
    /// The config's name of the head.
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::GapFc => "gap-fc",
            HeadKind::OneConvTwoFc => "1c2f",
            HeadKind::Dgl => "dgl",
            HeadKind::ClsFc => "cls-fc",
            HeadKind::MeanFc => "mean-fc",
        }
    }

    /// Whether the head reads token sequences (a ViT's) rather than feature maps.
    pub fn reads_tokens(self) -> bool {
        matches!(self, HeadKind::ClsFc | HeadKind::MeanFc)
    }
}

/// How InfoPro's classification term is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InfoProMode {
    Softmax,
    Contrast,
}

/// AugLocal's auxiliary networks (`[method.auglocal]`, docs/method.md §3): module i's is
/// `depth_i` fresh blocks shaped like later layers chosen uniformly up to the last one, then
/// pooling and a linear classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugLocalConfig {
    /// d: the depth of the first module's auxiliary network (the official README's ResNet-32
    /// run uses 2, its ResNet-110 run 3, its ImageNet ResNet-34 run 4).
    pub depth: usize,
    /// c: how much the depth shrinks toward the last module, `depth_i = max(1,
    /// round(d·(1 − t) + t))` with t = i·c/(K−2) (ties to even, as Python rounds); 0 keeps
    /// every depth d (the official ImageNet runs), 0.5 is the official CIFAR runs'.
    pub pyramid: f64,
    /// MLAAN on AugLocal: what the cascade loss runs after the cascade's modules: `lam` (the
    /// default: MLAAN's leap-augmented chain with its EMA twin, then a classifier), or
    /// `auxiliary` (AugLocal's auxiliary network of the step in its place).
    pub cascade: AugLocalCascade,
}

impl Default for AugLocalConfig {
    fn default() -> Self {
        AugLocalConfig { depth: 2, pyramid: 0.5, cascade: AugLocalCascade::Lam }
    }
}

/// What follows the cascade's modules under `mlaan-auglocal` (`method.auglocal.cascade`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AugLocalCascade {
    /// MLAAN's LAM chain (copies of later blocks with an EMA twin), then a classifier head.
    Lam,
    /// AugLocal's auxiliary network of the step (fresh blocks shaped like later layers).
    Auxiliary,
}

/// The method and its hyper-parameters (`[method]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    pub name: Method,
    /// Classifier head; default `cls-fc` on a ViT, else `gap-fc` for DGL-based methods and
    /// `1c2f` for InfoPro-based ones.
    pub head: Option<HeadKind>,
    pub infopro_mode: InfoProMode,
    /// MLAAN on InfoPro: the mode of the independent loss alone (unset: `infopro_mode`). The
    /// official code's independent head is always the contrastive one.
    pub independent_mode: Option<InfoProMode>,
    /// InfoPro's (λ1, λ2) at module 0; interpolated linearly to `lambda_last` at module K-2.
    pub lambda_first: [f64; 2],
    pub lambda_last: [f64; 2],
    /// Temperature of the supervised-contrastive loss.
    pub contrast_temperature: f64,
    /// MLAAN: weight of the independent auxiliary loss.
    pub w_ind: f64,
    /// MLAAN: weight of the cascade auxiliary loss.
    pub w_casc: f64,
    /// MLAAN: how many modules a cascade loss reaches (d).
    pub cascade_depth: usize,
    /// MLAAN with d = 3: whether step 1, whose cascade cannot reach three modules, still gets
    /// an independent loss and a cascade of reach 1. The official code gives it no loss at
    /// all (module 1 then learns from step 2's cascade alone), which is the default.
    pub early_cascades: bool,
    /// MLAAN: EMA momentum m of the twins (`p_ema ← m·p_ema + (1−m)·p_real`).
    pub ema_momentum: f64,
    /// Which real-block weights a twin folds in after step b.
    pub ema_lag: EmaLagRule,
    /// Which twins are updated at all (`all`, or the official CIFAR code's `last`, or `none`).
    pub ema_update: EmaUpdate,
    pub lam: LamConfig,
    /// AugLocal's auxiliary networks (`auglocal`, `mlaan-auglocal`).
    pub auglocal: AugLocalConfig,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            name: Method::E2e,
            head: None,
            infopro_mode: InfoProMode::Softmax,
            independent_mode: None,
            lambda_first: [5.0, 0.05],
            lambda_last: [0.2, 0.5],
            contrast_temperature: 0.07,
            w_ind: 0.001,
            w_casc: 0.999,
            cascade_depth: 2,
            early_cascades: false,
            ema_momentum: 0.995,
            ema_lag: EmaLagRule::Auto,
            ema_update: EmaUpdate::All,
            lam: LamConfig::default(),
            auglocal: AugLocalConfig::default(),
        }
    }
}

impl MethodConfig {
    /// The heads of `arch`: `method.head`, else the backbone's default — `cls-fc` for a ViT
    /// (its own classifier's form), `1c2f` under InfoPro's loss and `gap-fc` otherwise for
    /// convolutional networks (what the InfoPro and MLAAN codes use).
    pub fn head_for(&self, arch: &ArchSpec) -> HeadKind {
        self.head.unwrap_or(if arch.vit().is_some() {
            HeadKind::ClsFc
        } else if self.name.uses_infopro_loss() {
            HeadKind::OneConvTwoFc
        } else {
            HeadKind::GapFc
        })
    }

    /// InfoPro's (λ1, λ2) for module `i` of `k` (linear from module 0 to module K-2).
    pub fn lambdas(&self, i: usize, k: usize) -> (f64, f64) {
        let t = if k > 2 { i as f64 / (k - 2) as f64 } else { 0.0 };
        let lerp = |a: f64, b: f64| a + (b - a) * t;
        (
            lerp(self.lambda_first[0], self.lambda_last[0]),
            lerp(self.lambda_first[1], self.lambda_last[1]),
        )
    }
}

impl MethodConfig {
    /// The checks of `[method]` alone; what the method needs of the model or the schedule is
    /// checked in `rules`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_mlaan() && !(2..=3).contains(&self.cascade_depth) {
            return Err(bad_value("method.cascade_depth", self.cascade_depth, "must be 2 or 3"));
        }
        for (key, v) in [("method.w_ind", self.w_ind), ("method.w_casc", self.w_casc)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad_value(key, v, "must be a finite number ≥ 0"));
            }
        }
        if !(0.0..1.0).contains(&self.ema_momentum) {
            return Err(bad_value("method.ema_momentum", self.ema_momentum, "must be in [0, 1)"));
        }
        if let (Some(mode), false) = (self.independent_mode, self.name == Method::MlaanInfopro) {
            return Err(bad_value(
                "method.independent_mode",
                mode,
                "applies to mlaan-infopro only (the independent loss of MLAAN on InfoPro)",
            ));
        }
        if !is_positive(self.contrast_temperature) {
            return Err(bad_value(
                "method.contrast_temperature",
                self.contrast_temperature,
                "must be > 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.lam.pyramid) {
            return Err(bad_value("method.lam.pyramid", self.lam.pyramid, "must be in [0, 1]"));
        }
        if self.lam.depth == 0 {
            return Err(bad_value("method.lam.depth", self.lam.depth, "must be at least 1"));
        }
        let a = &self.auglocal;
        if a.depth == 0 {
            return Err(bad_value("method.auglocal.depth", a.depth, "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&a.pyramid) {
            return Err(bad_value("method.auglocal.pyramid", a.pyramid, "must be in [0, 1]"));
        }
        if a.cascade == AugLocalCascade::Auxiliary && self.name != Method::MlaanAuglocal {
            return Err(bad_value(
                "method.auglocal.cascade",
                "auxiliary",
                "applies to mlaan-auglocal only (what its cascade loss runs)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::load_text as load;
    use crate::config::PlacementRule;

    #[test]
    fn ema_lag_and_placement_are_typed() {
        let c = load("[method]\nema_lag = \"distance\"\n", &["pipeline.placement=flops"]).unwrap();
        assert_eq!(
            (c.method.ema_lag, c.pipeline.placement),
            (EmaLagRule::Distance, PlacementRule::Flops)
        );
        let e = load("", &["method.ema_lag=soon"]).unwrap_err().to_string();
        assert!(e.contains("`method.ema_lag=soon`") && e.contains("`latest`"), "{e}");
        let e = load("[pipeline]\nplacement = \"random\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("random") && e.contains("`flops`"), "{e}");
        let resolved: Vec<EmaLagRule> = [Schedule::Sequential, Schedule::Sync, Schedule::Async]
            .map(|s| EmaLagRule::Auto.resolve(s))
            .into();
        assert_eq!(resolved, [EmaLagRule::Exact, EmaLagRule::Distance, EmaLagRule::Latest]);
        assert_eq!(EmaLagRule::Latest.resolve(Schedule::Sync), EmaLagRule::Latest);
    }

    #[test]
    fn lambda_interpolates_from_first_to_module_k_minus_2() {
        let m = MethodConfig::default();
        assert_eq!(m.lambdas(0, 16), (5.0, 0.05));
        let (a, b) = m.lambdas(14, 16);
        assert!((a - 0.2).abs() < 1e-12 && (b - 0.5).abs() < 1e-12);
        let (a, b) = m.lambdas(7, 16);
        assert!((a - 2.6).abs() < 1e-12 && (b - 0.275).abs() < 1e-12);
    }
}

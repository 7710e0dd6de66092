//! Gradient routes of every method (docs/method.md §3–4), checked on the product's own module
//! machinery: which parameters each loss reaches and which it must not; and the summed
//! gradients of one step against an independent, literal implementation written here.

mod common;

use common::{max_rel_diff, nonzero, tiny};
use mlaan_core::arch::Chw;
use mlaan_core::config::{AugLocalCascade, OnNonFinite};
use mlaan_core::micro::MicroBatches;
use mlaan_core::plan::ImageSpec;
use mlaan_core::plan::{NetworkPlan, TermKind};
use mlaan_engine::init::{build_nets, initial_state, load_state};
use mlaan_engine::module::{LocalModule, ModuleSettings};
use mlaan_engine::optim::LrSchedule;
use mlaan_engine::stage::Stage;
use mlaan_engine::wire::{BatchTargets, ModuleState};
use mlaan_models::module::{LocalNets, Objective, Targets};
use mlaan_models::Mode;
use tch::{Device, Kind, Tensor};

const IMAGE: ImageSpec = ImageSpec { channels: 3, size: [8, 8], classes: 4 };

fn plan_of(method: &str, k: usize, d: usize) -> NetworkPlan {
    plan_on("resnet14", method, k, d)
}

/// A small ViT on the same 8x8 images: width 32, four blocks, two heads, 4x4 patches.
const VIT: &str = "vit-w32-d4-h2-p4";

/// `method` may end in `/auxiliary`: MLAAN on AugLocal with the step's AugLocal network in
/// the LAM chain's place (`method.auglocal.cascade`).
fn plan_on(arch: &str, method: &str, k: usize, d: usize) -> NetworkPlan {
    let (name, cascade) = method.split_once('/').unwrap_or((method, "lam"));
    let mut cfg = tiny(name, k);
    cfg.model.arch = arch.into();
    cfg.method.auglocal.cascade = match cascade {
        "auxiliary" => AugLocalCascade::Auxiliary,
        _ => AugLocalCascade::Lam,
    };
    cfg.method.cascade_depth = d;
    cfg.method.infopro_mode = mlaan_core::config::InfoProMode::Softmax;
    NetworkPlan::new(&cfg, Chw { c: 3, h: 8, w: 8 }, 4).unwrap()
}

/// A fixed batch, made without the (process-global) random generator.
fn batch() -> (Tensor, BatchTargets) {
    let i = Tensor::arange(8 * 3 * 8 * 8, (Kind::Float, Device::Cpu)).view([8, 3, 8, 8]);
    let x = (&i * 0.37).sin() + (&i * 0.011).cos();
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1, 2, 3]);
    let image = ((&i * 0.53).sin() * 127.0 + 128.0).to_kind(Kind::Uint8);
    (x, BatchTargets { labels, image_u8: Some(image) })
}

/// All modules in one stage, never stepping: gradients stay in the accumulators.
fn product_stage(plan: &NetworkPlan, states: &[ModuleState]) -> Stage {
    let modules = (0..plan.k())
        .map(|m| {
            let nets = build_nets(plan, m, IMAGE, Device::Cpu);
            load_state(&nets, &states[m]).unwrap();
            LocalModule::new(
                nets,
                ModuleSettings {
                    micro: MicroBatches::new(1_000_000),
                    ema_momentum: 0.995,
                    ..ModuleSettings::for_module(
                        plan,
                        m,
                        LrSchedule::constant(0.1),
                        Default::default(),
                    )
                },
            )
        })
        .collect();
    Stage::new(plan, modules, Device::Cpu, None)
}

/// Gradients of one batch through the product, by module and parameter name.
fn product_grads(plan: &NetworkPlan, states: &[ModuleState]) -> Vec<Vec<(String, Option<Tensor>)>> {
    let mut stage = product_stage(plan, states);
    let (x, t) = batch();
    let _ = stage.process(0, &x, &t, OnNonFinite::Stop).unwrap();
    stage.finish(0, false).unwrap();
    stage.modules.iter().map(|m| m.accumulated_grads()).collect()
}

/// Every module's networks, holding `states`.
fn loaded_nets(plan: &NetworkPlan, states: &[ModuleState]) -> Vec<LocalNets> {
    (0..plan.k())
        .map(|m| {
            let n = build_nets(plan, m, IMAGE, Device::Cpu);
            load_state(&n, &states[m]).unwrap();
            n
        })
        .collect()
}

/// docs/method.md literally: every loss gets its own forward from the detached output where its
/// gradient must stop, and its own backward.
fn reference_grads(plan: &NetworkPlan, states: &[ModuleState]) -> Vec<LocalNets> {
    let nets = loaded_nets(plan, states);
    let (x, t) = batch();
    let image = t.image_u8.as_ref().unwrap().to_kind(Kind::Float) / 255.0;
    let targets = Targets { labels: &t.labels, image: Some(&image) };
    // h_j by value, once (batch statistics; running statistics untouched).
    let mut h = Vec::new();
    tch::no_grad(|| {
        let mut z = x.shallow_clone();
        for n in &nets {
            z = n.forward(&z, Mode::Recompute);
            h.push(z.shallow_clone());
        }
    });
    for (i, spec) in plan.modules.iter().enumerate() {
        for (ti, term) in spec.terms.iter().enumerate() {
            let start = i - term.reach;
            let mut z = if start == 0 { x.shallow_clone() } else { h[start - 1].detach() };
            for n in &nets[start..=i] {
                z = n.forward(&z, Mode::Recompute);
            }
            let out = nets[i].term_loss(ti, &z, &targets, Mode::Recompute);
            (out.loss * term.weight).backward();
        }
    }
    nets
}

fn check_against_reference(arch: &str, method: &str, k: usize, d: usize) {
    let plan = plan_on(arch, method, k, d);
    let states = initial_state(&plan, IMAGE, 3).unwrap();
    let product = product_grads(&plan, &states);
    let reference = reference_grads(&plan, &states);
    let mut compared = 0;
    for (m, (grads, nets)) in product.iter().zip(&reference).enumerate() {
        let vars = nets.vs.variables();
        for (name, g) in grads {
            let r = vars[name].grad();
            match (g, r.defined()) {
                (Some(g), true) => {
                    let diff = max_rel_diff(g, &r);
                    assert!(
                        diff < 1e-4,
                        "{arch} {method} K={k} d={d}: module {m} `{name}` differs by {diff:e}"
                    );
                    compared += 1;
                }
                (None, false) => {}
                (Some(g), false) => assert!(
                    !nonzero(&Some(g.shallow_clone())),
                    "{method}: module {m} `{name}` got a gradient the reference does not give"
                ),
                (None, true) => assert!(
                    r.abs().sum(Kind::Float).double_value(&[]) == 0.0,
                    "{method}: module {m} `{name}` lacks a gradient"
                ),
            }
        }
    }
    assert!(compared > 20, "{method}: only {compared} gradients compared");
}

#[test]
fn summed_gradients_equal_the_literal_reference() {
    for (arch, method, k, d) in [
        ("resnet14", "e2e", 1, 2),
        ("resnet14", "dgl", 4, 2),
        ("resnet14", "infopro", 4, 2),
        ("resnet14", "mlaan-dgl", 4, 2),
        ("resnet14", "mlaan-dgl", 6, 3),
        ("resnet14", "mlaan-infopro", 4, 2),
        ("resnet14", "mlaan-infopro", 5, 3),
        ("resnet14", "auglocal", 4, 2),
        ("resnet14", "mlaan-auglocal", 4, 2),
        ("resnet14", "mlaan-auglocal/auxiliary", 5, 3),
        (VIT, "e2e", 1, 2),
        (VIT, "dgl", 4, 2),
        (VIT, "mlaan-dgl", 4, 2),
        (VIT, "mlaan-infopro", 4, 2),
        (VIT, "auglocal", 4, 2),
        (VIT, "mlaan-auglocal", 4, 2),
    ] {
        check_against_reference(arch, method, k, d);
    }
}

/// Which (module, parameter) pairs get a non-zero gradient when only term `t` of module `i`
/// is weighted.
fn reached(
    method: &str,
    k: usize,
    d: usize,
    i: usize,
    t: usize,
) -> (NetworkPlan, Vec<Vec<(String, bool)>>) {
    reached_on("resnet14", method, k, d, i, t)
}

fn reached_on(
    arch: &str,
    method: &str,
    k: usize,
    d: usize,
    i: usize,
    t: usize,
) -> (NetworkPlan, Vec<Vec<(String, bool)>>) {
    let mut plan = plan_on(arch, method, k, d);
    for (mi, m) in plan.modules.iter_mut().enumerate() {
        for (ti, term) in m.terms.iter_mut().enumerate() {
            term.weight = if (mi, ti) == (i, t) { 1.0 } else { 0.0 };
        }
    }
    let states = initial_state(&plan, IMAGE, 3).unwrap();
    let grads = product_grads(&plan, &states);
    let r =
        grads.into_iter().map(|g| g.into_iter().map(|(n, g)| (n, nonzero(&g))).collect()).collect();
    (plan, r)
}

#[test]
fn every_loss_reaches_exactly_its_modules() {
    for (method, k, d) in [
        ("dgl", 4, 2),
        ("infopro", 4, 2),
        ("mlaan-dgl", 5, 2),
        ("mlaan-infopro", 5, 3),
        ("auglocal", 5, 2),
        ("mlaan-auglocal", 4, 2),
        ("mlaan-auglocal/auxiliary", 5, 3),
        ("e2e", 1, 2),
    ] {
        let plan = plan_of(method, k, d);
        for (i, spec) in plan.modules.iter().enumerate() {
            for (t, term) in spec.terms.iter().enumerate() {
                let prefix = match term.kind {
                    TermKind::Independent => "aux.independent.",
                    TermKind::Cascade => "aux.cascade.",
                    TermKind::Final => "fc.",
                };
                let (_, got) = reached(method, k, d, i, t);
                for (m, params) in got.iter().enumerate() {
                    for (name, hit) in params {
                        let backbone = !name.starts_with("aux.") && !name.starts_with("fc.");
                        let expect = if backbone {
                            (i - term.reach..=i).contains(&m)
                        } else {
                            m == i && name.starts_with(prefix)
                        };
                        assert_eq!(
                            *hit,
                            expect,
                            "{method} K={k} d={d}: {:?} loss of module {i} {} module {m} `{name}`",
                            term.kind,
                            if expect { "must reach" } else { "must not reach" }
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn mlaan_routes_match_method_md() {
    // d = 2: module 0 only from the cascade of step 1; independent never reaches i−1;
    // the cascade at step i reaches modules i−1..i; LAM copies only from their own cascade.
    let plan = plan_of("mlaan-dgl", 5, 2);
    assert!(plan.modules[0].terms.is_empty());
    let reach: Vec<Vec<(TermKind, usize)>> =
        plan.modules.iter().map(|m| m.terms.iter().map(|t| (t.kind, t.reach)).collect()).collect();
    assert_eq!(reach[1], vec![(TermKind::Independent, 0), (TermKind::Cascade, 1)]);
    assert_eq!(reach[4], vec![(TermKind::Final, 1)]);
    let (_, got) = reached("mlaan-dgl", 5, 2, 1, 1);
    assert!(
        got[0].iter().filter(|(n, _)| !n.starts_with("aux.")).all(|(_, h)| *h),
        "cascade of step 1 reaches module 0"
    );
    let (_, got) = reached("mlaan-dgl", 5, 2, 2, 1);
    assert!(got[0].iter().all(|(_, h)| !*h), "cascade of step 2 must not reach module 0");
    assert!(
        got[2].iter().any(|(n, h)| n.starts_with("aux.cascade.lam.") && *h),
        "LAM copies learn from their cascade"
    );
    let (_, got) = reached("mlaan-dgl", 5, 2, 2, 0);
    assert!(
        got[2].iter().all(|(n, h)| !n.starts_with("aux.cascade.") || !*h),
        "LAM copies get nothing from the independent loss"
    );
    assert!(got[1].iter().all(|(_, h)| !*h), "independent loss never reaches module i−1");
}

/// A ViT cut into K = 4 modules of one block each (the embedding in module 0), with what each
/// loss must reach written from docs/method.md §3–4, not read from the plan: DGL's (and
/// AugLocal's) loss of module i trains module i and its own head (network); MLAAN's (d = 2) independent loss of module i
/// trains module i and its independent head, its cascade modules i−1 and i, its LAM copies and
/// cascade head, and the final loss the last two modules and the classifier (`norm`, `head`);
/// e2e's loss trains everything. No loss reaches an EMA twin or another term's networks.
#[test]
fn vit_routes_follow_the_method_definition() {
    // (method, module, term) → the modules whose backbone it trains, the networks it trains.
    let cases: [(&str, usize, usize, &[usize], &str); 12] = [
        ("auglocal", 0, 0, &[0], "aux.independent."),
        ("auglocal", 2, 0, &[2], "aux.independent."),
        ("dgl", 0, 0, &[0], "aux.independent."),
        ("dgl", 1, 0, &[1], "aux.independent."),
        ("dgl", 2, 0, &[2], "aux.independent."),
        ("dgl", 3, 0, &[3], "head."),
        ("mlaan-dgl", 1, 0, &[1], "aux.independent."),
        ("mlaan-dgl", 1, 1, &[0, 1], "aux.cascade."),
        ("mlaan-dgl", 2, 0, &[2], "aux.independent."),
        ("mlaan-dgl", 2, 1, &[1, 2], "aux.cascade."),
        ("mlaan-dgl", 3, 0, &[2, 3], "head."),
        ("e2e", 3, 0, &[0, 1, 2, 3], "head."),
    ];
    for (method, i, t, modules, nets) in cases {
        let k = 4;
        let (plan, got) = reached_on(VIT, method, k, 2, i, t);
        assert_eq!(plan.modules[0].block_refs.len(), 1, "one block per module");
        assert!(plan.modules[0].with_stem, "the embedding joins module 0");
        for (m, params) in got.iter().enumerate() {
            for (name, hit) in params {
                // The classifier (`norm`, `head`) belongs to the final loss alone.
                let classifier = name.starts_with("norm.") || name.starts_with("head.");
                let backbone = !name.starts_with("aux.") && !classifier;
                let expect = if backbone {
                    modules.contains(&m)
                } else {
                    m == i && (name.starts_with(nets) || (nets == "head." && classifier))
                };
                // A term's head gets gradient; its LAM copies too (cascade) — every one of
                // its parameters, so `expect` holds for each.
                assert_eq!(
                    *hit,
                    expect,
                    "{method}: term {t} of module {i} {} module {m} `{name}`",
                    if expect { "must train" } else { "must not train" }
                );
            }
        }
    }
    // The cascade of step 1 runs a LAM chain of copies of later blocks (blocks.N in its own
    // store), and it is those copies that learn.
    let (_, got) = reached_on(VIT, "mlaan-dgl", 4, 2, 1, 1);
    assert!(got[1].iter().any(|(n, h)| n.starts_with("aux.cascade.lam.") && *h));
}

#[test]
fn ema_twins_never_take_gradient() {
    let plan = plan_of("mlaan-dgl", 5, 2);
    let states = initial_state(&plan, IMAGE, 3).unwrap();
    let mut stage = product_stage(&plan, &states);
    let (x, t) = batch();
    let _ = stage.process(0, &x, &t, OnNonFinite::Stop).unwrap();
    stage.finish(0, false).unwrap();
    let mut twins = 0;
    for m in &stage.modules {
        for (name, v) in m.nets.ema_vs.variables() {
            assert!(!v.requires_grad(), "twin `{name}` is trainable");
            assert!(!v.grad().defined(), "twin `{name}` got a gradient");
            twins += 1;
        }
    }
    assert!(twins > 0);
}

/// InfoPro's local loss written out here from docs/method.md §3 — λ1·BCE(dec(z), x_raw) +
/// λ2·CE(head(z), y), with λ interpolated linearly from module 0 to module K-2 and x_raw the
/// image in [0,1] — against every term the product builds: InfoPro's, and both paths (the
/// independent one on h_i, the cascade one after its LAM chain) of MLAAN on InfoPro.
#[test]
fn infopro_terms_compute_the_method_md_loss() {
    let k = 5;
    for method in ["infopro", "mlaan-infopro"] {
        let plan = plan_of(method, k, 2);
        let states = initial_state(&plan, IMAGE, 5).unwrap();
        let nets = loaded_nets(&plan, &states);
        let (x, t) = batch();
        let raw = t.image_u8.as_ref().unwrap().to_kind(Kind::Float) / 255.0;
        let targets = Targets { labels: &t.labels, image: Some(&raw) };
        let mut checked = 0;
        tch::no_grad(|| {
            let mut h = x.shallow_clone();
            for (i, n) in nets.iter().enumerate() {
                h = n.forward(&h, Mode::Recompute);
                for (ti, term) in n.terms.iter().enumerate() {
                    let Objective::InfoPro { decoder, head, lambda1, lambda2, contrast } =
                        &term.objective
                    else {
                        continue;
                    };
                    assert!(contrast.is_none());
                    let s = i as f64 / (k - 2) as f64;
                    let (l1, l2) = (5.0 + (0.2 - 5.0) * s, 0.05 + (0.5 - 0.05) * s);
                    assert!(
                        (lambda1 - l1).abs() < 1e-12 && (lambda2 - l2).abs() < 1e-12,
                        "{method} module {i} {:?}: λ = ({lambda1}, {lambda2}), want ({l1}, {l2})",
                        term.spec.kind
                    );
                    let z = match &term.lam {
                        Some(lam) => lam.forward(&h, Mode::Recompute),
                        None => h.shallow_clone(),
                    };
                    let r = decoder.forward(&z, Mode::Recompute);
                    assert_eq!(r.size(), raw.size(), "the decoder reconstructs the whole image");
                    let (one_minus_x, one_minus_r) = (raw.ones_like() - &raw, r.ones_like() - &r);
                    let bce = -(&raw * r.log() + one_minus_x * one_minus_r.log()).mean(Kind::Float);
                    let logp = head.forward(&z, Mode::Recompute).log_softmax(1, Kind::Float);
                    let ce = -logp.gather(1, &t.labels.view([-1, 1]), false).mean(Kind::Float);
                    let want = bce * l1 + ce * l2;
                    let got = n.term_loss(ti, &h, &targets, Mode::Recompute).loss;
                    let diff = max_rel_diff(&got, &want);
                    assert!(diff < 1e-5, "{method} module {i} {:?}: {diff:e}", term.spec.kind);
                    checked += 1;
                }
            }
        });
        // InfoPro: modules 0..K-2. MLAAN: modules 1..K-2, two paths each.
        let terms = if method == "infopro" { k - 1 } else { 2 * (k - 2) };
        assert_eq!(checked, terms, "{method}");
    }
}

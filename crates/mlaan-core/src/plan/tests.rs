//! The network plan's tests: terms, reaches, chains and AugLocal networks per method.

use super::*;

fn plan(method: &str, k: usize, d: usize) -> NetworkPlan {
    let mut cfg = RunConfig::default();
    cfg.method.name = method.parse().unwrap();
    cfg.model.k = k;
    cfg.method.cascade_depth = d;
    NetworkPlan::new(&cfg, Chw { c: 3, h: 32, w: 32 }, 10).unwrap()
}

#[test]
fn the_independent_loss_can_have_its_own_infopro_mode() {
    let mut cfg = RunConfig::default();
    cfg.method.name = Method::MlaanInfopro;
    cfg.model.k = 4;
    cfg.method.independent_mode = Some(InfoProMode::Contrast);
    cfg.validate().unwrap();
    let p = NetworkPlan::new(&cfg, Chw { c: 3, h: 32, w: 32 }, 10).unwrap();
    let mode = |t: &TermSpec| match t.objective {
        ObjectiveSpec::InfoPro { mode, .. } => mode,
        _ => panic!("not InfoPro"),
    };
    for m in &p.modules[1..3] {
        assert_eq!(
            (mode(&m.terms[0]), mode(&m.terms[1])),
            (InfoProMode::Contrast, InfoProMode::Softmax)
        );
    }
    cfg.method.name = Method::MlaanDgl;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("method.independent_mode") && e.contains("mlaan-infopro only"), "{e}");
}

#[test]
fn depth_three_follows_the_official_code() {
    // The official d = 3 code: no loss at steps 0 and 1; from step 2 on an independent
    // loss and a cascade reaching three modules; the final loss reaches three too.
    use TermKind::{Cascade, Final, Independent};
    let routes = |p: &NetworkPlan| -> Vec<Vec<(TermKind, usize)>> {
        p.modules.iter().map(|m| m.terms.iter().map(|t| (t.kind, t.reach)).collect()).collect()
    };
    let official = plan("mlaan-dgl", 6, 3);
    assert_eq!(
        routes(&official),
        vec![
            vec![],
            vec![],
            vec![(Independent, 0), (Cascade, 2)],
            vec![(Independent, 0), (Cascade, 2)],
            vec![(Independent, 0), (Cascade, 2)],
            vec![(Final, 2)],
        ]
    );
    assert_eq!(official.chains.iter().map(|c| c.step).collect::<Vec<_>>(), vec![2, 3, 4]);
    // `early_cascades` keeps step 1's losses, with the reach it has.
    let mut cfg = RunConfig::default();
    cfg.method.name = Method::MlaanDgl;
    cfg.model.k = 6;
    cfg.method.cascade_depth = 3;
    cfg.method.early_cascades = true;
    let early = NetworkPlan::new(&cfg, Chw { c: 3, h: 32, w: 32 }, 10).unwrap();
    assert_eq!(routes(&early)[1], vec![(Independent, 0), (Cascade, 1)]);
    assert_eq!(early.chains.iter().map(|c| c.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    // d = 2 is the same either way: step 1 is the first with a loss.
    assert_eq!(routes(&plan("mlaan-dgl", 6, 2))[1], vec![(Independent, 0), (Cascade, 1)]);
}

#[test]
fn ema_update_marks_which_twins_follow_their_block() {
    let follows = |update: &str| -> Vec<(usize, bool)> {
        let mut cfg = RunConfig::default();
        cfg.method.name = Method::MlaanDgl;
        cfg.model.k = 8;
        cfg.method.ema_update = toml::from_str::<std::collections::BTreeMap<String, EmaUpdate>>(
            &format!("u = \"{update}\""),
        )
        .unwrap()["u"];
        let p = NetworkPlan::new(&cfg, Chw { c: 3, h: 32, w: 32 }, 10).unwrap();
        p.chains.iter().map(|c| (c.step, c.ema_follows)).collect()
    };
    let steps: Vec<usize> = (1..7).collect();
    assert_eq!(follows("all"), steps.iter().map(|&s| (s, true)).collect::<Vec<_>>());
    assert_eq!(follows("last"), steps.iter().map(|&s| (s, s == 6)).collect::<Vec<_>>());
    assert_eq!(follows("none"), steps.iter().map(|&s| (s, false)).collect::<Vec<_>>());
}

#[test]
fn mlaan_routes_follow_method_md() {
    let p = plan("mlaan-dgl", 4, 2);
    assert!(p.modules[0].terms.is_empty(), "module 0 has no loss of its own");
    for i in 1..3 {
        let kinds: Vec<_> = p.modules[i].terms.iter().map(|t| (t.kind, t.reach)).collect();
        assert_eq!(kinds, vec![(TermKind::Independent, 0), (TermKind::Cascade, 1)]);
    }
    assert_eq!(p.modules[3].terms.len(), 1);
    assert_eq!((p.modules[3].terms[0].kind, p.modules[3].terms[0].reach), (TermKind::Final, 1));
    let r = |i| crate::routes::ModuleRoutes::of(&p, i);
    assert!(r(0).from_later && r(2).from_later && !r(3).from_later);
    // The last module's only loss reaches back; the others also have local ones.
    assert!(r(3).all_continue && !r(2).all_continue);
    assert!(!r(0).all_continue);
    let p3 = plan("mlaan-infopro", 8, 3);
    assert!(p3.modules[1].terms.is_empty(), "official d = 3: no loss at step 1");
    assert_eq!(p3.modules[5].terms[1].reach, 2);
    assert_eq!(p3.max_reach(), 2);
    // Module 3 gets reach-left 1 from step 5's cascade (via 4) and 0 from step 4's.
    let reach_left = |i, from| crate::routes::incoming_reach_left(&p3, i, from);
    assert_eq!(reach_left(3, 4), Some(1));
    assert_eq!(reach_left(3, 5), Some(0));
    assert_eq!(reach_left(7, 8), None);
}

#[test]
fn base_methods_are_local() {
    let p = plan("dgl", 4, 2);
    assert!(p.modules.iter().all(|m| m.terms.len() == 1 && m.terms[0].reach == 0));
    assert!(!crate::routes::ModuleRoutes::of(&p, 0).from_later);
    let p = plan("infopro", 4, 2);
    match &p.modules[2].terms[0].objective {
        ObjectiveSpec::InfoPro { lambda1, lambda2, .. } => {
            assert!((lambda1 - 0.2).abs() < 1e-12 && (lambda2 - 0.5).abs() < 1e-12)
        }
        o => panic!("{o:?}"),
    }
    let e = plan("e2e", 1, 2);
    assert_eq!(e.modules[0].terms[0].kind, TermKind::Final);
}

#[test]
fn mlaan_on_auglocal_puts_its_network_where_the_config_says() {
    use crate::config::AugLocalCascade;
    let of = |cascade: AugLocalCascade| {
        let mut cfg = RunConfig::default();
        cfg.method.name = Method::MlaanAuglocal;
        cfg.model.k = 4;
        cfg.method.auglocal.cascade = cascade;
        cfg.validate().unwrap();
        NetworkPlan::new(&cfg, Chw { c: 3, h: 32, w: 32 }, 10).unwrap()
    };
    let lam = of(AugLocalCascade::Lam);
    let t = &lam.modules[1].terms;
    let c = lam.modules[1].output.c;
    assert!(matches!(&t[0].objective, ObjectiveSpec::AugLocal(n) if n.in_channels == c));
    assert!(t[1].lam.is_some());
    assert_eq!(t[1].objective, ObjectiveSpec::Classify { head: HeadKind::GapFc, in_channels: 64 });
    assert_eq!(lam.chains.len(), 2);
    let aux = of(AugLocalCascade::Auxiliary);
    let t = &aux.modules[2].terms;
    assert_eq!((t[1].kind, t[1].reach, t[1].lam.is_none()), (TermKind::Cascade, 1, true));
    assert_eq!(t[0].objective, t[1].objective, "both read h_i through the step's network");
    assert!(aux.chains.is_empty(), "no LAM chains, no EMA twins");
    let mut cfg = RunConfig::default();
    cfg.method.name = Method::Auglocal;
    cfg.model.k = 4;
    cfg.method.auglocal.cascade = AugLocalCascade::Auxiliary;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("method.auglocal.cascade"), "{e}");
}

#[test]
fn macs_cover_the_backbone() {
    let p = plan("dgl", 4, 2);
    let total: f64 = p.module_macs().iter().sum();
    let whole = plan("e2e", 1, 2).module_macs()[0];
    assert!((total - whole).abs() < 1.0);
    assert!(whole > 6.0e7 && whole < 7.5e7, "ResNet-32 is ~69M MACs, got {whole}");
}

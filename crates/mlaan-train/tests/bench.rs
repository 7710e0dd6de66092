//! The benchmark runner measures every case on the same batches and reports shares that add
//! up and memory that is counted.

mod common;

use common::tiny;
use mlaan_core::device::DeviceSpec;
use mlaan_train::bench::{case_config, run, BenchSpec};

#[test]
fn every_case_is_measured() {
    let mut base = tiny("mlaan-dgl", 4);
    base.pipeline.devices = vec![DeviceSpec::Cpu; 2];
    let spec = BenchSpec {
        base,
        cases: [
            "e2e",
            "gpipe",
            "dgl",
            "mlaan-dgl",
            "mlaan-dgl:sync",
            "mlaan-dgl:sequential",
            "mlaan-dgl:sync+recompute",
        ]
        .map(String::from)
        .to_vec(),
        warmup: 1,
        steps: 4,
        repeats: 2,
        micro_batches: 2,
        world: None,
        launcher: None,
    };
    let r = run(&spec, &mut |_| {}).unwrap();
    assert_eq!(r.cases.len(), 7);
    assert_eq!(r.cases[6].name, "mlaan-dgl sync +recompute");
    for c in &r.cases {
        assert_eq!(c.images_per_s.len(), 2, "{}", c.name);
        assert!(c.median() > 0.0, "{}", c.name);
        let stages = if c.name == "e2e" || c.name.ends_with("sequential") { 1 } else { 2 };
        assert_eq!(c.stages.len(), stages, "{}", c.name);
        for s in &c.stages {
            let total = s.busy + s.wait_input + s.wait_output + s.wait_grad;
            assert!(s.busy > 0.0 && total <= 1.05, "{} stage {}: shares {total}", c.name, s.stage);
            assert!(s.peak_live_bytes > 0, "{} stage {}", c.name, s.stage);
            // The phases are parts of the busy time, and every stage runs forwards.
            let phases: f64 = s.phases.values().sum();
            assert!(phases <= s.busy + 1e-9, "{} stage {}: phases {phases}", c.name, s.stage);
            assert!(s.phases["forward"] > 0.0, "{} stage {}: {:?}", c.name, s.stage, s.phases);
            assert!(s.gflop_per_s > 0.0, "{} stage {}", c.name, s.stage);
        }
    }
    // End-to-end backprop: one backward pass to the parameters, one optimizer step per batch.
    let phases = &r.cases[0].stages[0].phases;
    assert!(phases["backward_params"] > 0.0 && phases["optimizer"] > 0.0, "{phases:?}");
    let e2e = r.cases.iter().find(|c| c.name == "e2e").unwrap();
    assert_eq!(r.speedup(e2e, "e2e"), Some(1.0));
    assert!(r.memory_ratio(&r.cases[2]).unwrap() < 1.0, "a DGL stage holds less than e2e");
}

#[test]
fn bad_cases_are_named() {
    let spec = BenchSpec {
        base: tiny("dgl", 4),
        cases: vec![],
        warmup: 0,
        steps: 1,
        repeats: 1,
        micro_batches: 3,
        world: None,
        launcher: None,
    };
    let e = case_config(&spec, "mlaan-dgl:fast").unwrap_err().to_string();
    assert!(e.contains("fast"), "{e}");
    let e = case_config(&spec, "backprop").unwrap_err().to_string();
    assert!(e.contains("backprop"), "{e}");
    let e = format!("{:#}", case_config(&spec, "gpipe").unwrap_err());
    assert!(e.contains("micro_batches"), "{e}");
    assert!(case_config(&spec, "dgl:sync+recompute").unwrap().pipeline.recompute);
    assert!(!case_config(&spec, "dgl:sync").unwrap().pipeline.recompute);
    let c = case_config(&spec, "mlaan-dgl:sync+bf16+channels-last+default-stream").unwrap();
    assert_eq!(c.train.precision, mlaan_core::config::Precision::Bf16);
    assert_eq!(c.train.memory_format, mlaan_core::config::MemoryFormat::ChannelsLast);
    assert_eq!(c.pipeline.streams, mlaan_core::config::StreamMode::Default);
    let e = case_config(&spec, "dgl+bf17").unwrap_err().to_string();
    assert!(e.contains("`+bf17`") && e.contains("+bf16"), "{e}");
}

//! Shared helpers of the training tests: tiny configs and tensor comparisons.
#![allow(dead_code)]

use mlaan_core::config::{RunConfig, Schedule};
use mlaan_core::device::DeviceSpec;
use mlaan_engine::wire::{Event, ModuleSnapshot};
use mlaan_train::session::{RunOptions, Session};
use tch::Tensor;

/// A ResNet-14 (six blocks) on 8x8 synthetic images: every method and split in milliseconds.
pub fn tiny(method: &str, k: usize) -> RunConfig {
    let mut c = RunConfig::default();
    c.model.arch = "resnet14".into();
    c.model.k = k;
    c.method.name = method.parse().unwrap();
    c.data.dataset = "synthetic".into();
    c.data.synthetic_size = 8;
    c.data.synthetic_channels = 3;
    c.data.synthetic_classes = 4;
    c.data.synthetic_samples = 256;
    c.data.workers = 1;
    c.train.batch_size = 8;
    c.train.seed = 7;
    c.train.log_every = 5;
    c.optim.lr = 0.05;
    c.pipeline.devices = vec![DeviceSpec::Cpu];
    c.pipeline.schedule = mlaan_core::config::Schedule::Sequential;
    c.pipeline.intra_op_threads = 1;
    c
}

/// [`tiny`] on another backbone and image side: `vit-tiny-p4` on 8x8 images (four patches
/// and the class token), a CIFAR VGG on 16x16 (the least its four pools allow).
pub fn tiny_on(arch: &str, side: usize, method: &str, k: usize) -> RunConfig {
    let mut c = tiny(method, k);
    c.model.arch = arch.into();
    c.data.synthetic_size = side;
    c
}

/// MLAAN (DGL heads) with its four modules on four CPU stages.
pub fn mlaan_on_four_stages(schedule: Schedule) -> RunConfig {
    let mut c = tiny("mlaan-dgl", 4);
    c.pipeline.schedule = schedule;
    c.pipeline.devices = vec![DeviceSpec::Cpu; 4];
    c
}

/// Feed training batches, epoch after epoch, until `steps` have been sent; `on_batch` sees the
/// events after every batch.
pub fn feed_steps(
    s: &mut Session,
    steps: u64,
    on_batch: &mut dyn FnMut(Vec<Event>) -> anyhow::Result<bool>,
) {
    let mut epoch = 0;
    while s.next_id() < steps {
        s.feed_epoch(epoch, steps, on_batch).unwrap();
        epoch += 1;
    }
}

/// Largest |a − b| relative to max(1, |b|).
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1.0);
    d / scale
}

/// Whether a gradient is present and not all zero.
pub fn nonzero(g: &Option<Tensor>) -> bool {
    g.as_ref().is_some_and(|g| g.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0)
}

/// Train `cfg` for `steps` steps, drain, and return every module's state.
pub fn run(cfg: &RunConfig, steps: u64) -> Vec<ModuleSnapshot> {
    let mut s = Session::start(cfg, &RunOptions::default()).unwrap();
    feed_steps(&mut s, steps, &mut |_| Ok(false));
    s.drain().unwrap();
    let snaps = s.snapshots().unwrap();
    s.finish().unwrap();
    snaps
}

/// Every parameter, buffer, EMA twin and momentum buffer of two runs agree within `tol`
/// (relative, [`max_rel_diff`]).
pub fn assert_close(what: &str, a: &[ModuleSnapshot], b: &[ModuleSnapshot], tol: f64) {
    assert_eq!(a.len(), b.len());
    let mut compared = 0;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step, "{what}: module {} steps", x.module);
        assert_eq!(x.state.len(), y.state.len(), "{what}: module {} state size", x.module);
        for ((n1, t1), (n2, t2)) in x.state.iter().zip(&y.state) {
            assert_eq!(n1, n2);
            let d = max_rel_diff(t1, t2);
            assert!(d < tol, "{what}: module {} `{n1}` differs by {d:e}", x.module);
            compared += 1;
        }
        assert_eq!(x.momentum.len(), y.momentum.len());
        for ((n1, t1), (_, t2)) in x.momentum.iter().zip(&y.momentum) {
            let d = max_rel_diff(t1, t2);
            assert!(d < tol, "{what}: module {} momentum of `{n1}` differs by {d:e}", x.module);
        }
    }
    assert!(compared > 50, "{what}: only {compared} tensors compared");
}

/// The last module's mean loss over each metrics window of `steps` steps.
pub fn loss_curve(cfg: &RunConfig, steps: u64) -> Vec<f64> {
    let mut s = Session::start(cfg, &RunOptions::default()).unwrap();
    let last = cfg.model.k - 1;
    let mut curve = Vec::new();
    feed_steps(&mut s, steps, &mut |events| {
        for e in events {
            if let Event::Window { term_losses, .. } = e {
                for (m, l) in term_losses {
                    if m == last && !l.is_empty() {
                        curve.push(l.iter().sum::<f64>() / l.len() as f64);
                    }
                }
            }
        }
        Ok(false)
    });
    s.drain().unwrap();
    s.finish().unwrap();
    curve
}

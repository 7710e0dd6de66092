//! Micro-benchmarks of the pipeline's hot paths, to set their costs side by side:
//! - `stage_step`: one batch through one stage of MLAAN (ResNet-32, K = 4, CIFAR-shaped,
//!   batch 32) — forward, local losses, backward sweep, parameter pass, SGD step and EMA fold
//!   (module 0 has no loss of its own: its gradient comes from module 1's cascade, so alone
//!   it measures forward and step);
//! - `channel_hop`: handing a realistic activation (the 16×32×32 output of module 0, batch 32)
//!   to the next stage's thread through a bounded channel and getting it back.
//!
//! `cargo bench --bench hot_paths` (the loader's images/s: `cargo bench -p mlaan-data`).
//! On a CPU a stage step takes milliseconds and a hop microseconds: moving activations between
//! stages is not what limits the pipeline.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::bounded;
use mlaan_core::arch::Chw;
use mlaan_core::config::OnNonFinite;
use mlaan_core::config::RunConfig;
use mlaan_core::plan::ImageSpec;
use mlaan_core::plan::NetworkPlan;
use mlaan_engine::init::build_nets;
use mlaan_engine::module::{LocalModule, ModuleSettings};
use mlaan_engine::optim::LrSchedule;
use mlaan_engine::stage::Stage;
use mlaan_engine::wire::BatchTargets;
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 32;
const IMAGE: ImageSpec = ImageSpec { channels: 3, size: [32, 32], classes: 10 };

fn plan() -> NetworkPlan {
    let mut cfg = RunConfig::default();
    cfg.model.arch = "resnet32".into();
    cfg.model.k = 4;
    cfg.method.name = "mlaan-dgl".parse().expect("method");
    NetworkPlan::new(&cfg, Chw { c: 3, h: 32, w: 32 }, 10).expect("plan")
}

fn module(plan: &NetworkPlan, m: usize) -> LocalModule {
    let settings = ModuleSettings {
        ema_momentum: 0.995,
        ..ModuleSettings::for_module(plan, m, LrSchedule::constant(0.1), Default::default())
    };
    LocalModule::new(build_nets(plan, m, IMAGE, Device::Cpu), settings)
}

fn targets() -> BatchTargets {
    BatchTargets {
        labels: Tensor::arange(BATCH, (Kind::Int64, Device::Cpu)).remainder(10),
        image_u8: None,
    }
}

fn stage_step(c: &mut Criterion) {
    tch::set_num_threads(1);
    let plan = plan();
    // Each module's input, in the shape the module before it outputs.
    let inputs: Vec<Tensor> = (0..plan.k())
        .map(|m| {
            let [c, h, w] = match m {
                0 => [3, 32, 32],
                _ => {
                    let o = plan.modules[m - 1].output;
                    [o.c as i64, o.h as i64, o.w as i64]
                }
            };
            Tensor::randn([BATCH, c, h, w], (Kind::Float, Device::Cpu))
        })
        .collect();
    let mut g = c.benchmark_group("stage_step");
    g.sample_size(20).throughput(Throughput::Elements(BATCH as u64));
    for (m, x) in inputs.iter().enumerate() {
        let mut stage = Stage::new(&plan, vec![module(&plan, m)], Device::Cpu, None);
        let t = targets();
        let mut id = 0u64;
        g.bench_function(BenchmarkId::new("mlaan-dgl resnet32 K=4 module", m), |b| {
            b.iter(|| {
                let _ = stage.process(id, x, &t, OnNonFinite::Stop).expect("process");
                stage.finish(id, false).expect("finish");
                id += 1;
            })
        });
    }
    g.finish();
}

fn channel_hop(c: &mut Criterion) {
    let (to_next, next_in) = bounded::<Tensor>(2);
    let (back, back_in) = bounded::<Tensor>(2);
    let echo = std::thread::spawn(move || {
        for t in next_in {
            if back.send(t.to_device(Device::Cpu)).is_err() {
                break;
            }
        }
    });
    let activation = Tensor::randn([BATCH, 16, 32, 32], (Kind::Float, Device::Cpu));
    let mut g = c.benchmark_group("channel_hop");
    g.throughput(Throughput::Bytes(activation.numel() as u64 * 4));
    g.bench_function("16x32x32 activation, batch 32, there and back", |b| {
        b.iter(|| {
            to_next.send(activation.shallow_clone()).expect("send");
            back_in.recv().expect("recv")
        })
    });
    g.finish();
    drop(to_next);
    echo.join().expect("echo thread");
}

criterion_group!(benches, stage_step, channel_hop);
criterion_main!(benches);

//! `mlaan-pipe bench`: every configuration on the same devices, in one process, repeated and
//! interleaved after a warm-up, fed from the same batches held in memory (so the loader does
//! not compete for the cores). Throughput is measured from the first timed batch to a drained
//! pipeline, i.e. with device synchronisation.
//!
//! Cases are written `METHOD[:SCHEDULE]`; `e2e` is end-to-end backprop on the first device,
//! `gpipe` is micro-batched pipelined backprop over all devices, a local method defaults to
//! `async` over all devices, and `:sequential` runs every module on the first device. A
//! `+recompute` suffix (`mlaan-dgl:sync+recompute`) trades a second forward for memory; `+bf16`,
//! `+fp16`, `+channels-last`, `+default-stream` and their opposites set how a case computes
//! (`dgl+bf16+default-stream`). A case is compared with the baseline (`e2e`, `gpipe`) that has
//! the same compute modifiers when the run has one, so bf16 cases are measured against bf16
//! e2e.
//!
//! Data parallelism: `ddp` is e2e with one replica per device (D processes, gradients
//! all-reduced: what users would otherwise run), and `CASE*R` is any case with R replicas, each
//! the whole case on its devices. Those run as R processes (`mlaan-pipe launch ... bench`, one
//! repetition per launch, still interleaved with the others); their throughput is all
//! replicas' together, and each stage reports what it all-reduced per step and the share of
//! its time that took.

use crate::devices::{self, GpuPeakSampler};
use crate::distributed::World;
use crate::flops::module_flops;
use crate::session::{to_tensors, RunOptions, Session};
use anyhow::{bail, Context, Result};
use mlaan_core::bench::{AllocatorPeak, BenchReport, CaseResult, StageShare};
use mlaan_core::config::{Method, RunConfig, Schedule};
use mlaan_core::device::DeviceSpec;
use mlaan_core::plan::NetworkPlan;
use mlaan_data::{Datasets, Loader, LoaderConfig};
use mlaan_engine::wire::BatchTargets;
use mlaan_engine::wire::Event;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Model, data, batch size and K; `pipeline.devices` are the devices of pipelined cases.
    pub base: RunConfig,
    pub cases: Vec<String>,
    pub warmup: usize,
    pub steps: usize,
    pub repeats: usize,
    /// Micro-batches of the GPipe case.
    pub micro_batches: usize,
    /// The replicas this process is one of (`None`: alone). Set when the bench itself runs
    /// under a launcher, as it does for the replicated cases.
    pub world: Option<Arc<World>>,
    /// The mlaan-pipe binary that starts the processes of a replicated case.
    pub launcher: Option<PathBuf>,
}

/// `CASE*R` → (`CASE`, Some(R)); `ddp` → (`ddp`, Some(devices)); else (case, None).
fn split_replicas<'a>(spec: &BenchSpec, case: &'a str) -> Result<(&'a str, Option<usize>)> {
    if case == "ddp" {
        return Ok((case, Some(spec.base.pipeline.devices.len().max(2))));
    }
    match case.rsplit_once('*') {
        Some((inner, r)) => match r.parse::<usize>() {
            Ok(r) if r >= 1 => Ok((inner, Some(r))),
            _ => bail!("case `{case}`: `*{r}` is not a number of replicas (1 or more)"),
        },
        None => Ok((case, None)),
    }
}

/// The run config of one case.
pub fn case_config(spec: &BenchSpec, case: &str) -> Result<RunConfig> {
    let mut c = spec.base.clone();
    let (case, _) = split_replicas(spec, case)?;
    let (core, modifiers) = split_modifiers(case)?;
    for apply in modifiers.into_iter().filter_map(modifier) {
        apply(&mut c);
    }
    let (method, schedule) = match core.split_once(':') {
        Some((m, s)) => (m, Some(s)),
        None => (core, None),
    };
    let first = vec![c.pipeline.devices[0]];
    match method {
        // One device per replica: a node's GPUs are sliced among its processes (one each),
        // CPU processes share the machine.
        "ddp" => {
            c.method.name = Method::E2e;
            c.model.k = 1;
            c.pipeline.schedule = Schedule::Sequential;
            if !c.pipeline.devices.iter().all(|d| d.is_cuda()) {
                c.pipeline.devices = first;
            }
        }
        "e2e" => {
            c.method.name = Method::E2e;
            c.model.k = 1;
            c.pipeline.schedule = Schedule::Sequential;
            c.pipeline.devices = first;
        }
        "gpipe" => {
            c.method.name = Method::E2e;
            c.pipeline.schedule = Schedule::Sync;
            c.pipeline.micro_batches = spec.micro_batches;
        }
        m => {
            c.method.name = m.parse().map_err(anyhow::Error::msg)?;
            c.pipeline.schedule = match schedule.unwrap_or("async") {
                "async" => Schedule::Async,
                "sync" => Schedule::Sync,
                "sequential" => {
                    c.pipeline.devices = first;
                    Schedule::Sequential
                }
                s => bail!("case `{case}`: unknown schedule `{s}` (async, sync, sequential)"),
            };
        }
    }
    if matches!(method, "e2e" | "gpipe" | "ddp") {
        if let Some(s) = schedule {
            bail!("case `{case}`: `{method}` takes no schedule (`:{s}`)");
        }
    }
    // Windows are reported at drains only: one window per timed run.
    c.train.log_every = usize::MAX / 2;
    c.validate().with_context(|| format!("case `{case}`"))?;
    Ok(c)
}

/// Run every case `repeats` times, interleaved; `progress` hears about each measurement.
pub fn run(spec: &BenchSpec, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let configs: Vec<(String, RunConfig)> = spec
        .cases
        .iter()
        .map(|c| Ok((display_name(c), case_config(spec, c)?)))
        .collect::<Result<_>>()?;
    // (case as run, replicas it needs launched) of each case.
    let replicated: Vec<(&str, Option<usize>)> =
        spec.cases.iter().map(|c| split_replicas(spec, c)).collect::<Result<_>>()?;
    let data = mlaan_data::open(&spec.base.data).context("opening the benchmark data")?;
    let batches = sample_batches(&data, &spec.base, spec.warmup + spec.steps)?;
    let mut results: Vec<CaseResult> = configs
        .iter()
        .zip(&replicated)
        .map(|((name, c), (_, replicas))| CaseResult {
            name: name.clone(),
            method: c.method.name.to_string(),
            schedule: c.pipeline.schedule.to_string(),
            devices: DeviceSpec::names(&c.pipeline.devices),
            k: c.model.k,
            micro_batches: c.pipeline.micro_batches,
            replicas: replicas.unwrap_or(world_size(spec)),
            ..Default::default()
        })
        .collect();
    let mut per_rep: Vec<Vec<Measurement>> = configs.iter().map(|_| Vec::new()).collect();
    for rep in 0..spec.repeats {
        for (i, ((name, cfg), &(inner, replicas))) in configs.iter().zip(&replicated).enumerate() {
            let m = match replicas {
                Some(r) if world_size(spec) == 1 => launch_case(spec, inner, r),
                _ => measure(cfg, &batches, spec.warmup, spec.steps, spec.world.clone()),
            }
            .with_context(|| format!("benchmark case `{name}`"))?;
            progress(&format!(
                "rep {}/{}  {name:<24} {:>9.1} images/s",
                rep + 1,
                spec.repeats,
                m.images_per_s
            ));
            per_rep[i].push(m);
        }
    }
    for (r, ms) in results.iter_mut().zip(per_rep) {
        r.images_per_s = ms.iter().map(|m| m.images_per_s).collect();
        let med = mlaan_core::bench::median(&r.images_per_s);
        let pick = ms
            .into_iter()
            .min_by(|a, b| (a.images_per_s - med).abs().total_cmp(&(b.images_per_s - med).abs()))
            .expect("at least one repetition");
        r.stages = pick.stages;
        r.gpu_peak_bytes = pick.gpu_peak_bytes;
        r.allocator = pick.allocator;
        r.reducers = pick.reducers;
    }
    let image = data.info.image();
    for (r, (_, cfg)) in results.iter_mut().zip(&configs) {
        let plan = NetworkPlan::new(cfg, image.chw(), image.classes)?;
        let flops = module_flops(&plan, image, cfg.pipeline.recompute)?;
        let per_replica = r.median() / r.replicas.max(1) as f64;
        for st in &mut r.stages {
            let per_sample: f64 = st.modules.iter().map(|&m| flops[m].train_flops).sum();
            st.gflop_per_s = per_sample * per_replica / 1e9;
        }
    }
    let b = &spec.base;
    let first = &batches[0].0;
    let size = first.size();
    let uses_gpu = b.pipeline.devices.iter().any(|d| d.is_cuda());
    Ok(BenchReport {
        arch: b.model.arch.clone(),
        dataset: b.data.dataset.clone(),
        input: [size[1] as usize, size[2] as usize, size[3] as usize],
        batch_size: b.train.batch_size,
        k: b.model.k,
        devices: DeviceSpec::names(&b.pipeline.devices),
        warmup_steps: spec.warmup,
        timed_steps: spec.steps,
        repeats: spec.repeats,
        memory_note: if uses_gpu {
            "GPU: the caching allocator's peak allocated / reserved bytes per device, reset at \
             the start of each case (torch.cuda.max_memory_allocated / max_memory_reserved; \
             every stage on a device counts in its figure); NVML per-process used memory \
             (CUDA context and the allocator's cache included, sampled every 10 ms, only grows \
             along the run); and the exact live tensor bytes per stage"
                .into()
        } else {
            "CPU devices: exact live tensor bytes per stage (parameters, aux, LAM, EMA, optimizer \
             state, gradients, inputs and graphs in flight); process peak RSS below"
                .into()
        },
        peak_rss_bytes: devices::peak_rss_bytes(),
        cases: results,
    })
}

/// A case's `+` modifiers, each a setting of the case's config: `+recompute`
/// (`pipeline.recompute`), `+fp32` / `+bf16` / `+fp16` (`train.precision`), `+channels-last` /
/// `+contiguous` (`train.memory_format`), `+default-stream` / `+stream-per-stage`
/// (`pipeline.streams`). Returns the case without them, and them in the order written.
fn split_modifiers(case: &str) -> Result<(&str, Vec<&str>)> {
    let mut parts = case.split('+');
    let core = parts.next().unwrap_or_default();
    let mods: Vec<&str> = parts.collect();
    for m in &mods {
        if modifier(m).is_none() {
            let names: Vec<&str> = MODIFIERS.iter().map(|(n, _)| *n).collect();
            bail!("case `{case}`: unknown modifier `+{m}` (one of +{})", names.join(", +"));
        }
    }
    Ok((core, mods))
}

/// What a modifier does to a case's config.
type Apply = fn(&mut RunConfig);

/// Every modifier and the setting it makes.
const MODIFIERS: [(&str, Apply); 8] = {
    use mlaan_core::config::{MemoryFormat, Precision, StreamMode};
    [
        ("recompute", |c| c.pipeline.recompute = true),
        ("fp32", |c| c.train.precision = Precision::Fp32),
        ("bf16", |c| c.train.precision = Precision::Bf16),
        ("fp16", |c| c.train.precision = Precision::Fp16),
        ("channels-last", |c| c.train.memory_format = MemoryFormat::ChannelsLast),
        ("contiguous", |c| c.train.memory_format = MemoryFormat::Contiguous),
        ("default-stream", |c| c.pipeline.streams = StreamMode::Default),
        ("stream-per-stage", |c| c.pipeline.streams = StreamMode::PerStage),
    ]
};

fn modifier(name: &str) -> Option<Apply> {
    MODIFIERS.iter().find(|(n, _)| *n == name).map(|(_, apply)| *apply)
}

fn display_name(case: &str) -> String {
    let (case, replicas) = match case.rsplit_once('*') {
        Some((inner, r)) => (inner, Some(r)),
        None => (case, None),
    };
    let (core, modifiers) = split_modifiers(case).unwrap_or((case, Vec::new()));
    let mut name = match core.split_once(':') {
        Some((m, s)) => format!("{m} {s}"),
        None if matches!(core, "e2e" | "gpipe" | "ddp") => core.to_string(),
        None => format!("{core} async"),
    };
    for m in modifiers {
        name.push_str(&format!(" +{m}"));
    }
    if let Some(r) = replicas {
        name.push_str(&format!(" ×{r}"));
    }
    name
}

fn world_size(spec: &BenchSpec) -> usize {
    spec.world.as_ref().map_or(1, |w| w.size())
}

/// One repetition of `case` as `replicas` processes: `mlaan-pipe launch` runs this bench with
/// that case alone, and rank 0's report comes back.
fn launch_case(spec: &BenchSpec, case: &str, replicas: usize) -> Result<Measurement> {
    let exe = spec.launcher.as_ref().context("a replicated case needs the mlaan-pipe binary")?;
    let tmp = tempfile::tempdir().context("creating a directory for a replicated case")?;
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, spec.base.to_toml())?;
    let out = tmp.path().join("out");
    let n = |v: usize| v.to_string();
    let o = std::process::Command::new(exe)
        .args(["launch", "--nproc-per-node", &n(replicas), "--grace-s", "5", "--", "bench"])
        .arg("--config")
        .arg(&config)
        .args(["--cases", case, "--warmup", &n(spec.warmup), "--steps", &n(spec.steps)])
        .args(["--repeats", "1", "--micro-batches", &n(spec.micro_batches), "--quiet"])
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .output()
        .with_context(|| format!("starting {}", exe.display()))?;
    if !o.status.success() {
        bail!(
            "{replicas} replica processes failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim_end()
        );
    }
    let path = out.join("bench.json");
    let report: BenchReport = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let c = report.cases.into_iter().next().context("the replicas reported no case")?;
    Ok(Measurement {
        images_per_s: c.images_per_s.first().copied().unwrap_or(0.0),
        stages: c.stages,
        gpu_peak_bytes: c.gpu_peak_bytes,
        allocator: c.allocator,
        reducers: c.reducers,
    })
}

/// Batches from the base config's training data, held in memory.
fn sample_batches(
    data: &Datasets,
    cfg: &RunConfig,
    n: usize,
) -> Result<Vec<(Tensor, BatchTargets)>> {
    let loader = Loader::new(
        data.train.clone(),
        data.train_transform.clone(),
        LoaderConfig::train(&cfg.data, cfg.train.batch_size, cfg.train.seed),
    );
    let mut out = Vec::new();
    for b in loader.epoch(0).take(n.clamp(1, 16)) {
        out.push(to_tensors(&b?, true));
    }
    if out.is_empty() {
        bail!("the benchmark data gives no batch of {}", cfg.train.batch_size);
    }
    Ok(out)
}

struct Measurement {
    images_per_s: f64,
    stages: Vec<StageShare>,
    gpu_peak_bytes: Vec<u64>,
    allocator: Vec<AllocatorPeak>,
    /// With replicas: each module's reducer.
    reducers: Vec<String>,
}

fn measure(
    cfg: &RunConfig,
    batches: &[(Tensor, BatchTargets)],
    warmup: usize,
    steps: usize,
    world: Option<Arc<World>>,
) -> Result<Measurement> {
    let replicas = world.as_ref().map_or(1, |w| w.size());
    let devices = crate::devices::resolve(&cfg.pipeline.devices)?;
    // Each case's peaks are its own: everything an earlier case held is freed by now.
    crate::devices::reset_allocator_peaks(&devices)?;
    let mut s = Session::start(cfg, &RunOptions { world, ..RunOptions::default() })?;
    let feed = |s: &mut Session, i: usize| -> Result<Vec<Event>> {
        let (x, t) = &batches[i % batches.len()];
        let image_u8 = s.needs_image().then(|| x.shallow_clone());
        s.send_batch(
            x.shallow_clone(),
            BatchTargets { labels: t.labels.shallow_clone(), image_u8 },
        )?;
        s.take_events()
    };
    for i in 0..warmup {
        feed(&mut s, i)?;
    }
    s.drain()?;
    // One peak per physical GPU.
    let gpus = crate::devices::distinct_gpus(&devices);
    let sampler = GpuPeakSampler::start(&gpus, Duration::from_millis(10));
    let t = Instant::now();
    let mut events = Vec::new();
    for i in 0..steps {
        events.extend(feed(&mut s, warmup + i)?);
    }
    events.extend(s.drain()?);
    let elapsed = t.elapsed().as_secs_f64();
    let gpu_peak_bytes = sampler.map(|g| g.finish()).unwrap_or_default();
    let stages_n = s.num_stages();
    let reducers =
        s.reducers().map_or_else(Vec::new, |r| r.iter().map(ToString::to_string).collect());
    let final_bytes = s.finish()?;
    let allocator = crate::devices::allocator_peaks(&devices)?;
    let mut stages: Vec<StageShare> =
        (0..stages_n).map(|i| StageShare { stage: i, ..Default::default() }).collect();
    let mut wall = vec![0.0; stages_n];
    for e in events {
        if let Event::Window { stage, window: w, .. } = e {
            let st = &mut stages[stage];
            st.device = w.device.clone();
            st.modules = w.modules.clone();
            st.busy += w.busy_ms;
            st.wait_input += w.wait_input_ms;
            st.wait_output += w.wait_output_ms;
            st.wait_grad += w.wait_grad_ms;
            st.allreduce += w.allreduce_ms;
            for (phase, ms) in &w.phases_ms {
                *st.phases.entry(phase.clone()).or_default() += ms;
            }
            st.allreduce_bytes_per_step += w.allreduce_bytes as f64 / steps.max(1) as f64;
            wall[stage] += w.wall_ms;
        }
    }
    for (st, (w, (_, peak))) in stages.iter_mut().zip(wall.iter().zip(final_bytes)) {
        let w = w.max(1e-9);
        st.busy /= w;
        st.wait_input /= w;
        st.wait_output /= w;
        st.wait_grad /= w;
        st.allreduce /= w;
        st.phases.values_mut().for_each(|ms| *ms /= w);
        st.peak_live_bytes = peak;
    }
    Ok(Measurement {
        images_per_s: (steps * cfg.train.batch_size * replicas) as f64 / elapsed,
        stages,
        gpu_peak_bytes,
        allocator,
        reducers,
    })
}

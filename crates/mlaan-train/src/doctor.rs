//! `mlaan-pipe doctor`: what this machine offers a run, and why a GPU is not used when it is
//! not (in the spirit of `python -m torch.utils.collect_env`). Every fact is looked up, not
//! assumed: the libtorch that is running and whether its CUDA backend loaded (with the loader's
//! message), the driver and GPUs as NVML sees them and as this process numbers them, NCCL,
//! Gloo, the cores this process may use, and the dataset folder.

use crate::devices::{self, CudaGpu};
use serde::Serialize;
use std::fmt::Write as _;

/// Everything `doctor` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mlaan_pipe: String,
    pub libtorch_version: Option<String>,
    pub libtorch_dir: Option<String>,
    /// `None`: libtorch's CUDA backend loaded; else the loader's message.
    pub cuda_backend_error: Option<String>,
    /// CUDA devices libtorch can use.
    pub libtorch_cuda_devices: usize,
    pub cuda_visible_devices: Option<String>,
    pub driver: Result<Driver, String>,
    /// Every GPU of the machine, in NVML's (PCI) order.
    pub nvml_gpus: Result<Vec<NvmlGpu>, String>,
    /// The GPUs this process sees, in CUDA's order (libtorch's `cuda:N`), each with the NVML
    /// index of the same device.
    pub cuda_gpus: Result<Vec<VisibleGpu>, String>,
    pub nccl: Result<Nccl, String>,
    /// Gloo is compiled into libtorch_cpu; the project links c10d's ProcessGroupGloo.
    pub gloo: String,
    pub cores: Cores,
    pub data: Data,
    /// One line: whether `--gpus` will work here, and if not, why.
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Driver {
    pub version: String,
    /// The newest CUDA the driver supports, e.g. `13.0`.
    pub cuda: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NvmlGpu {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub pci_bus_id: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VisibleGpu {
    #[serde(flatten)]
    pub gpu: CudaGpu,
    pub nvml_index: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nccl {
    pub path: String,
    pub version: String,
    pub loaded_by_libtorch: bool,
    /// `None` when cudarc loads it (replicas on GPUs reduce with it under `auto`); else why
    /// not.
    pub cudarc_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cores {
    /// Cores this process may run on (its CPU affinity; cgroup quotas apply on top).
    pub usable: usize,
    /// Cores of the machine.
    pub online: usize,
    pub omp_num_threads: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Data {
    pub dataset: String,
    pub dir: String,
    pub found: bool,
    /// What was found (or why not).
    pub detail: String,
}

/// Look everything up. `dataset` and `dir` name the data to look for (defaults: the default
/// dataset in its default folder).
pub fn inspect(dataset: Option<&str>, dir: Option<&std::path::Path>) -> Report {
    let backend = devices::load_cuda_backend();
    let cuda_backend_error = match backend {
        mlaan_accel::CudaBackend::Loaded => None,
        mlaan_accel::CudaBackend::NotLoaded(msg) => Some(msg.clone()),
    };
    let libtorch_cuda_devices = devices::cuda_device_count();
    let nvml = nvml_report();
    let nvml_uuids: Vec<String> = match &nvml {
        Ok((_, gpus)) => gpus.iter().map(|g| g.uuid.clone()).collect(),
        Err(_) => Vec::new(),
    };
    let cuda_gpus = devices::cuda_gpus().map(|gpus| {
        let uuids: Vec<String> = gpus.iter().map(|g| g.uuid.clone()).collect();
        let matched = devices::match_by_uuid(&uuids, &nvml_uuids);
        let nvml_index = |i: Option<usize>| -> Option<u32> {
            let (_, list) = nvml.as_ref().ok()?;
            Some(list[i?].index)
        };
        gpus.into_iter()
            .zip(matched)
            .map(|(gpu, m)| VisibleGpu { gpu, nvml_index: nvml_index(m) })
            .collect()
    });
    let verdict = if libtorch_cuda_devices > 0 {
        format!(
            "--gpus can use {libtorch_cuda_devices} GPU(s) (cuda:0..{})",
            libtorch_cuda_devices - 1
        )
    } else {
        format!("no GPU for --gpus: {}", devices::why_no_cuda())
    };
    Report {
        mlaan_pipe: env!("CARGO_PKG_VERSION").to_string(),
        libtorch_version: mlaan_accel::libtorch_version(),
        libtorch_dir: mlaan_accel::libtorch_dir().map(|d| d.display().to_string()),
        cuda_backend_error,
        libtorch_cuda_devices,
        cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        driver: nvml.as_ref().map(|(d, _)| d.clone()).map_err(Clone::clone),
        nvml_gpus: nvml.map(|(_, g)| g),
        cuda_gpus,
        nccl: mlaan_dist::nccl::locate().map(|l| Nccl {
            path: l.path.display().to_string(),
            version: l.version,
            loaded_by_libtorch: l.loaded_by_libtorch,
            cudarc_error: mlaan_dist::nccl::load().err().map(|e| e.to_string()),
        }),
        gloo: "compiled into libtorch_cpu (c10d's ProcessGroupGloo)".into(),
        cores: cores(),
        data: data(dataset, dir),
        verdict,
    }
}

fn nvml_report() -> Result<(Driver, Vec<NvmlGpu>), String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML: {e}"))?;
    let cuda = nvml
        .sys_cuda_driver_version()
        .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
        .unwrap_or_else(|e| format!("? ({e})"));
    let driver = Driver { version: nvml.sys_driver_version().map_err(|e| e.to_string())?, cuda };
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let gpus = (0..count)
        .map(|i| {
            let d = nvml.device_by_index(i).map_err(|e| format!("NVML device {i}: {e}"))?;
            let mem = d.memory_info().map_err(|e| e.to_string())?;
            Ok(NvmlGpu {
                index: i,
                name: d.name().unwrap_or_default(),
                uuid: d.uuid().unwrap_or_default(),
                pci_bus_id: d.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                total_bytes: mem.total,
                used_bytes: mem.used,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((driver, gpus))
}

fn cores() -> Cores {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sched_getaffinity fills the set for this process.
    let usable = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            libc::CPU_COUNT(&set) as usize
        } else {
            online
        }
    };
    let online =
        usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(online);
    Cores { usable, online, omp_num_threads: std::env::var("OMP_NUM_THREADS").ok() }
}

fn data(dataset: Option<&str>, dir: Option<&std::path::Path>) -> Data {
    let mut cfg = mlaan_core::config::DataConfig::default();
    if let Some(d) = dataset {
        cfg.dataset = d.to_string();
    }
    cfg.dir = dir.map(|d| d.to_path_buf());
    let shown = cfg.dir.clone().unwrap_or_else(|| mlaan_data::default_dir(&cfg.dataset));
    let (found, detail) = match mlaan_data::open(&cfg) {
        Ok(d) => (true, format!("{}; {}", d.train.describe(), d.test.describe())),
        Err(e) => (false, e.to_string()),
    };
    Data { dataset: cfg.dataset, dir: shown.display().to_string(), found, detail }
}

/// The report for a terminal.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    let _ = writeln!(o, "mlaan-pipe {}", r.mlaan_pipe);
    let _ = writeln!(
        o,
        "libtorch       {} at {}",
        r.libtorch_version.as_deref().unwrap_or("(version unknown)"),
        r.libtorch_dir.as_deref().unwrap_or("(not found)")
    );
    let _ = match &r.cuda_backend_error {
        None => writeln!(o, "CUDA backend   loaded (libtorch_cuda.so)"),
        Some(e) => writeln!(o, "CUDA backend   not loaded: {e}"),
    };
    let _ = writeln!(
        o,
        "libtorch GPUs  {}   CUDA_VISIBLE_DEVICES={}",
        r.libtorch_cuda_devices,
        r.cuda_visible_devices.as_deref().unwrap_or("unset")
    );
    let _ = match &r.driver {
        Ok(d) => writeln!(o, "driver         {} (CUDA {})", d.version, d.cuda),
        Err(e) => writeln!(o, "driver         none: {e}"),
    };
    match &r.nvml_gpus {
        Ok(gpus) if gpus.is_empty() => {
            let _ = writeln!(o, "NVML GPUs      none");
        }
        Ok(gpus) => {
            let _ =
                writeln!(o, "NVML GPUs      {} (every GPU of the machine, PCI order)", gpus.len());
            for g in gpus {
                let _ = writeln!(
                    o,
                    "  nvml {}  {}  {} ({} used)  {}  {}",
                    g.index,
                    g.name,
                    gib(g.total_bytes),
                    gib(g.used_bytes),
                    g.pci_bus_id,
                    g.uuid
                );
            }
        }
        Err(e) => {
            let _ = writeln!(o, "NVML GPUs      unavailable: {e}");
        }
    }
    match &r.cuda_gpus {
        Ok(gpus) => {
            let _ = writeln!(
                o,
                "CUDA GPUs      {} (this process's numbering: --gpus N is cuda:N)",
                gpus.len()
            );
            for g in gpus {
                let nvml = g.nvml_index.map_or("not matched".to_string(), |i| format!("nvml {i}"));
                let _ = writeln!(
                    o,
                    "  cuda:{}  {}  {}  {}  = {nvml}",
                    g.gpu.ordinal,
                    g.gpu.name,
                    gib(g.gpu.total_bytes),
                    g.gpu.uuid
                );
            }
        }
        Err(e) => {
            let _ = writeln!(o, "CUDA GPUs      unavailable: {e}");
        }
    }
    let _ = match &r.nccl {
        Ok(n) => writeln!(
            o,
            "NCCL           {} at {}{}; {}",
            n.version,
            n.path,
            if n.loaded_by_libtorch { " (loaded by libtorch)" } else { "" },
            match &n.cudarc_error {
                None => "replicas on GPUs reduce with it (distributed.backend = auto)".into(),
                Some(e) => format!("not usable through cudarc: {e}"),
            }
        ),
        Err(e) => writeln!(o, "NCCL           not available: {e}"),
    };
    let _ = writeln!(o, "Gloo           {}", r.gloo);
    let _ = writeln!(
        o,
        "cores          {} usable of {} online{}",
        r.cores.usable,
        r.cores.online,
        r.cores
            .omp_num_threads
            .as_deref()
            .map_or(String::new(), |t| format!(", OMP_NUM_THREADS={t}"))
    );
    let _ = writeln!(
        o,
        "data           {} in {}: {}",
        r.data.dataset,
        r.data.dir,
        if r.data.found { r.data.detail.clone() } else { format!("not usable: {}", r.data.detail) }
    );
    let _ = writeln!(o, "verdict        {}", r.verdict);
    o
}

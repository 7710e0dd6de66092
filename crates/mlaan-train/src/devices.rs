//! Devices: making libtorch's CUDA backend available, resolving `--gpus`/`--devices` to tch
//! devices with clear errors (every "no CUDA device" says why), naming each CUDA device as the
//! driver knows it, and reading GPU memory through NVML by the device's identity.

use mlaan_core::bench::AllocatorPeak;
use mlaan_core::device::DeviceSpec;
use serde::Serialize;
use tch::Device;

pub use mlaan_accel::{load_cuda_backend, CudaBackend};

/// Number of CUDA devices libtorch sees (honours `CUDA_VISIBLE_DEVICES`).
pub fn cuda_device_count() -> usize {
    load_cuda_backend();
    if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    }
}

/// Why libtorch sees no CUDA device here, in words a user can act on: the CUDA backend did not
/// load (with the loader's message, which names the missing library), there is no driver, or
/// `CUDA_VISIBLE_DEVICES` hides every GPU.
pub fn why_no_cuda() -> String {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let hidden = visible.as_deref().map(str::trim).is_some_and(|v| v.is_empty() || v == "-1");
    match load_cuda_backend() {
        mlaan_accel::CudaBackend::NotLoaded(msg) => format!(
            "libtorch's CUDA backend did not load ({msg}); this torch lacks its CUDA libraries \
             (`make setup CUDA=1` installs them; `mlaan-pipe doctor` says more)"
        ),
        mlaan_accel::CudaBackend::Loaded if hidden => {
            format!("CUDA_VISIBLE_DEVICES={:?} hides every GPU", visible.unwrap_or_default())
        }
        mlaan_accel::CudaBackend::Loaded => match cuda_gpus() {
            Err(why) => format!("libtorch's CUDA backend is loaded but {why}"),
            Ok(g) if g.is_empty() => "the driver reports no GPU".into(),
            Ok(g) => format!(
                "the driver lists {} GPU(s) but libtorch cannot use them (driver too old for \
                 CUDA 13? `mlaan-pipe doctor` says more)",
                g.len()
            ),
        },
    }
}

/// A device that was asked for is not there; the message says what is, and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MissingDevice(String);

/// Resolve device specs, failing with the index and what is available when a GPU is missing.
pub fn resolve(specs: &[DeviceSpec]) -> Result<Vec<Device>, MissingDevice> {
    let wants_cuda = specs.iter().any(|d| d.is_cuda());
    let count = if wants_cuda { cuda_device_count() } else { 0 };
    specs
        .iter()
        .map(|d| match *d {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) if i < count => Ok(Device::Cuda(i)),
            DeviceSpec::Cuda(i) => Err(MissingDevice(if count == 0 {
                format!(
                    "GPU {i} was asked for but no CUDA device is available: {}; use --devices \
                     cpu to train on the CPU",
                    why_no_cuda()
                )
            } else {
                format!(
                    "GPU {i} was asked for but only {count} CUDA device(s) are visible (0..{}; \
                     CUDA_VISIBLE_DEVICES={})",
                    count - 1,
                    std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
                )
            })),
        })
        .collect()
}

/// A CUDA device as this process numbers it (`CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER`
/// applied: libtorch's numbering), as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CudaGpu {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML and nvidia-smi write it.
    pub uuid: String,
    pub pci_bus_id: String,
}

/// Every CUDA device visible to this process, from the driver API (no context is created), or
/// why they cannot be listed.
pub fn cuda_gpus() -> Result<Vec<CudaGpu>, String> {
    use cudarc::driver::{result, sys};
    // SAFETY: a library lookup; unlike the calls below it cannot panic without a driver.
    if !unsafe { sys::is_culib_present() } {
        return Err("the NVIDIA driver's libcuda.so.1 is not installed".into());
    }
    let driver = |what: &str, e: cudarc::driver::DriverError| format!("{what}: {e:?}");
    result::init().map_err(|e| driver("cuInit", e))?;
    let count = result::device::get_count().map_err(|e| driver("cuDeviceGetCount", e))?;
    (0..count)
        .map(|i| {
            let dev = result::device::get(i).map_err(|e| driver("cuDeviceGet", e))?;
            let name = result::device::get_name(dev).map_err(|e| driver("cuDeviceGetName", e))?;
            // SAFETY: a query of a valid device handle.
            let total = unsafe { result::device::total_mem(dev) }
                .map_err(|e| driver("cuDeviceTotalMem", e))?;
            let uuid = result::device::get_uuid(dev).map_err(|e| driver("cuDeviceGetUuid", e))?;
            let mut bus = [0 as std::ffi::c_char; 32];
            // SAFETY: the buffer holds `len` bytes; the driver writes a NUL-terminated id.
            unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, dev) }
                .result()
                .map_err(|e| driver("cuDeviceGetPCIBusId", e))?;
            // SAFETY: NUL-terminated by the driver (the buffer was zeroed).
            let bus = unsafe { std::ffi::CStr::from_ptr(bus.as_ptr()) };
            Ok(CudaGpu {
                ordinal: i as usize,
                name,
                total_bytes: total as u64,
                uuid: uuid_text(&uuid.bytes.map(|b| b as u8)),
                pci_bus_id: bus.to_string_lossy().into_owned(),
            })
        })
        .collect()
}

/// A device UUID as NVML and nvidia-smi write it.
fn uuid_text(b: &[u8; 16]) -> String {
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

/// For each CUDA device (by UUID), the position of the NVML device with the same UUID. NVML
/// numbers every GPU of the machine in PCI order and ignores `CUDA_VISIBLE_DEVICES`, so its
/// index is another GPU's whenever SLURM or a user hides or reorders devices.
pub fn match_by_uuid(cuda: &[String], nvml: &[String]) -> Vec<Option<usize>> {
    cuda.iter().map(|u| nvml.iter().position(|n| n.eq_ignore_ascii_case(u))).collect()
}

/// The distinct CUDA indices among `devices`, in first-use order (stages may share a GPU).
pub fn distinct_gpus(devices: &[Device]) -> Vec<usize> {
    let mut gpus = Vec::new();
    for d in devices {
        if let Device::Cuda(i) = *d {
            if !gpus.contains(&i) {
                gpus.push(i);
            }
        }
    }
    gpus
}

/// Start a new peak window of the caching allocator on each GPU among `devices`, from an
/// empty cache: blocks an earlier case left cached would otherwise count in this one's
/// reserved peak.
pub fn reset_allocator_peaks(devices: &[Device]) -> Result<(), mlaan_accel::AccelError> {
    let gpus = distinct_gpus(devices);
    if gpus.is_empty() {
        return Ok(());
    }
    mlaan_accel::empty_cuda_cache()?;
    gpus.into_iter().try_for_each(|i| mlaan_accel::reset_cuda_peak(Device::Cuda(i)))
}

/// The caching allocator's peaks on each GPU among `devices` since the last reset (empty
/// without one).
pub fn allocator_peaks(devices: &[Device]) -> Result<Vec<AllocatorPeak>, mlaan_accel::AccelError> {
    distinct_gpus(devices)
        .into_iter()
        .map(|i| {
            let m = mlaan_accel::cuda_memory(Device::Cuda(i))?;
            Ok(AllocatorPeak {
                device: format!("cuda:{i}"),
                peak_allocated_bytes: m.peak_allocated,
                peak_reserved_bytes: m.peak_reserved,
            })
        })
        .collect()
}

/// Memory in use on one GPU, as NVML reports it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuMemory {
    /// The CUDA ordinal (libtorch's `cuda:N`).
    pub index: usize,
    pub uuid: String,
    /// Memory used by this process on the device (NVML per-process accounting).
    pub process_used_bytes: Option<u64>,
    /// Memory used on the device by everyone.
    pub device_used_bytes: u64,
    pub device_total_bytes: u64,
}

/// The NVML devices of some CUDA ordinals, found by UUID.
struct NvmlTargets {
    nvml: nvml_wrapper::Nvml,
    /// (CUDA ordinal, UUID).
    gpus: Vec<(usize, String)>,
}

impl NvmlTargets {
    /// `None` where NVML or the driver API is unavailable, or an ordinal is not visible.
    fn new(indices: &[usize]) -> Option<NvmlTargets> {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        let visible = cuda_gpus().ok()?;
        let gpus = indices
            .iter()
            .map(|&i| visible.get(i).map(|g| (i, g.uuid.clone())))
            .collect::<Option<Vec<_>>>()?;
        Some(NvmlTargets { nvml, gpus })
    }

    fn read(&self) -> Option<Vec<GpuMemory>> {
        let pid = std::process::id();
        self.gpus
            .iter()
            .map(|(i, uuid)| {
                let dev = self.nvml.device_by_uuid(uuid.as_str()).ok()?;
                let info = dev.memory_info().ok()?;
                let process_used_bytes = dev.running_compute_processes().ok().and_then(|ps| {
                    ps.iter().find(|p| p.pid == pid).and_then(|p| match p.used_gpu_memory {
                        nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                        nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                    })
                });
                Some(GpuMemory {
                    index: *i,
                    uuid: uuid.clone(),
                    process_used_bytes,
                    device_used_bytes: info.used,
                    device_total_bytes: info.total,
                })
            })
            .collect()
    }
}

/// Read NVML for the given CUDA ordinals (each matched to its NVML device by UUID); `None`
/// where NVML is unavailable.
pub fn gpu_memory(indices: &[usize]) -> Option<Vec<GpuMemory>> {
    NvmlTargets::new(indices)?.read()
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Samples this process's NVML memory on some GPUs in a background thread and keeps the peak.
pub struct GpuPeakSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u64>>,
}

impl GpuPeakSampler {
    /// Start sampling every `period`; `None` when NVML is unavailable or no GPU is named.
    pub fn start(indices: &[usize], period: std::time::Duration) -> Option<Self> {
        if indices.is_empty() {
            return None;
        }
        let targets = NvmlTargets::new(indices)?;
        targets.read()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let n = indices.len();
        let handle = std::thread::spawn(move || {
            let mut peak = vec![0u64; n];
            loop {
                if let Some(m) = targets.read() {
                    for (p, g) in peak.iter_mut().zip(m) {
                        *p = (*p).max(g.process_used_bytes.unwrap_or(g.device_used_bytes));
                    }
                }
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(period);
            }
        });
        Some(GpuPeakSampler { stop, handle })
    }

    /// Stop and return the peak bytes per GPU.
    pub fn finish(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_devices_are_matched_by_uuid_not_by_index() {
        // CUDA_VISIBLE_DEVICES=3,1 on a 4-GPU node: CUDA's 0 and 1 are NVML's 3 and 1.
        let nvml: Vec<String> =
            (0..4).map(|i| format!("GPU-{i:08x}-0000-0000-0000-000000000000")).collect();
        let cuda = vec![nvml[3].to_uppercase(), nvml[1].clone()];
        assert_eq!(match_by_uuid(&cuda, &nvml), vec![Some(3), Some(1)]);
        assert_eq!(match_by_uuid(&["GPU-gone".into()], &nvml), vec![None]);
    }

    #[test]
    fn uuids_are_written_as_nvml_writes_them() {
        let b: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(uuid_text(&b), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn without_cuda_the_error_says_why() {
        if cuda_device_count() > 0 {
            return;
        }
        let e = resolve(&[DeviceSpec::Cuda(0)]).unwrap_err().to_string();
        assert!(e.contains("GPU 0") && e.contains("--devices cpu"), "{e}");
        if let mlaan_accel::CudaBackend::NotLoaded(msg) = load_cuda_backend() {
            // The loader's own words, naming the missing library.
            assert!(e.contains("did not load") && e.contains(msg.as_str()), "{e}");
        }
    }

    #[test]
    fn distinct_gpus_keep_first_use_order_and_skip_cpus() {
        let d = [Device::Cuda(1), Device::Cpu, Device::Cuda(0), Device::Cuda(1), Device::Cuda(0)];
        assert_eq!(distinct_gpus(&d), vec![1, 0]);
        assert!(distinct_gpus(&[Device::Cpu]).is_empty());
    }
}

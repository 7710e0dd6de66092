//! Devices: making libtorch's CUDA backend available, resolving `--gpus`/`--devices` to tch
//! devices with clear errors, and reading GPU memory through NVML.

use mlaan_core::bench::AllocatorPeak;
use mlaan_core::device::DeviceSpec;
use tch::Device;

pub use mlaan_accel::load_cuda_backend;

/// Number of CUDA devices libtorch sees (honours `CUDA_VISIBLE_DEVICES`).
pub fn cuda_device_count() -> usize {
    load_cuda_backend();
    if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    }
}

/// A device that was asked for is not there; the message says what is.
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
                    "GPU {i} was asked for but no CUDA device is available (libtorch sees none; \
                     CUDA_VISIBLE_DEVICES={}); use --devices cpu",
                    std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
                )
            } else {
                format!(
                    "GPU {i} was asked for but only {count} CUDA device(s) are visible (0..{})",
                    count - 1
                )
            })),
        })
        .collect()
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

/// Start a new peak window of the caching allocator on each GPU among `devices`.
pub fn reset_allocator_peaks(devices: &[Device]) -> Result<(), mlaan_accel::AccelError> {
    distinct_gpus(devices)
        .into_iter()
        .try_for_each(|i| mlaan_accel::reset_cuda_peak(Device::Cuda(i)))
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
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuMemory {
    pub index: usize,
    /// Memory used by this process on the device (NVML per-process accounting).
    pub process_used_bytes: Option<u64>,
    /// Memory used on the device by everyone.
    pub device_used_bytes: u64,
    pub device_total_bytes: u64,
}

/// Read NVML for the given GPU indices; `None` where NVML is unavailable.
pub fn gpu_memory(indices: &[usize]) -> Option<Vec<GpuMemory>> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let pid = std::process::id();
    indices
        .iter()
        .map(|&i| {
            let dev = nvml.device_by_index(i as u32).ok()?;
            let info = dev.memory_info().ok()?;
            let process_used_bytes = dev.running_compute_processes().ok().and_then(|ps| {
                ps.iter().find(|p| p.pid == pid).and_then(|p| match p.used_gpu_memory {
                    nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                    nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                })
            });
            Some(GpuMemory {
                index: i,
                process_used_bytes,
                device_used_bytes: info.used,
                device_total_bytes: info.total,
            })
        })
        .collect()
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
        gpu_memory(indices)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let idx = indices.to_vec();
        let handle = std::thread::spawn(move || {
            let mut peak = vec![0u64; idx.len()];
            loop {
                if let Some(m) = gpu_memory(&idx) {
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
    fn distinct_gpus_keep_first_use_order_and_skip_cpus() {
        let d = [Device::Cuda(1), Device::Cpu, Device::Cuda(0), Device::Cuda(1), Device::Cuda(0)];
        assert_eq!(distinct_gpus(&d), vec![1, 0]);
        assert!(distinct_gpus(&[Device::Cpu]).is_empty());
    }
}

//! NCCL for the replica groups of modules on GPUs, through cudarc's bindings (`cudarc::nccl`,
//! loaded at run time): the `libnccl.so.2` that `libtorch_cuda.so` loads (from the
//! `nvidia-nccl-cu13` wheel beside torch), found and named so that every report and error
//! says which file is meant ([`locate`]), made loadable by cudarc ([`load`]: the build links
//! it under the name cudarc looks for), a unique id passed from rank 0 through the c10d store
//! ([`id`]), and communicators that reduce on the stage's stream and are aborted rather than
//! left hanging when a peer dies ([`comm`]).

pub mod comm;
pub mod id;

pub use comm::Communicator;

use crate::DistError;
use std::ffi::{c_int, c_void};
use std::path::PathBuf;

/// The file name the torch wheel ships NCCL under.
pub const SONAME: &str = "libnccl.so.2";

/// An NCCL library found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclLibrary {
    pub path: PathBuf,
    /// `2.28.9` (from `ncclGetVersion`).
    pub version: String,
    /// Whether libtorch had already loaded it into this process.
    pub loaded_by_libtorch: bool,
}

/// Where the torch wheel puts NCCL, relative to the running libtorch: `site-packages/nvidia/
/// nccl/lib` beside `site-packages/torch` (what `libtorch_cuda.so`'s RPATH points at).
pub fn wheel_path() -> Option<PathBuf> {
    let torch = mlaan_accel::libtorch_dir()?;
    Some(torch.parent()?.join("nvidia/nccl/lib").join(SONAME))
}

/// The NCCL libtorch uses: the copy already in the process when libtorch's CUDA backend loaded
/// it, else the wheel's file (loaded here, to read its version). The error names every path
/// tried and why each failed.
pub fn locate() -> Result<NcclLibrary, String> {
    let name = std::ffi::CString::new(SONAME).expect("no NUL");
    // SAFETY: RTLD_NOLOAD only returns a handle for a library already loaded.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if !handle.is_null() {
        return describe(handle, true);
    }
    let Some(path) = wheel_path() else {
        return Err(format!("{SONAME} is not loaded and libtorch's own directory is unknown"));
    };
    if !path.is_file() {
        return Err(format!(
            "{SONAME} is not loaded by libtorch and not at {} (the slim CPU install has no \
             NCCL; `make setup CUDA=1` installs torch's CUDA libraries)",
            path.display()
        ));
    }
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: dlopen of an existing file by absolute path; the handle is kept for the process.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(format!("{} does not load: {}", path.display(), dl_error()));
    }
    describe(handle, false)
}

/// The path and version of a loaded NCCL.
fn describe(handle: *mut c_void, loaded_by_libtorch: bool) -> Result<NcclLibrary, String> {
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: looks a symbol up in a live handle.
    let sym = unsafe { libc::dlsym(handle, c"ncclGetVersion".as_ptr()) };
    if sym.is_null() {
        return Err(format!("{SONAME} has no ncclGetVersion: {}", dl_error()));
    }
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `sym` is an address inside the library; dladdr fills `info`.
    let path = if unsafe { libc::dladdr(sym, &mut info) } != 0 && !info.dli_fname.is_null() {
        let p = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned();
        std::fs::canonicalize(&p).unwrap_or_else(|_| PathBuf::from(p))
    } else {
        PathBuf::from(SONAME)
    };
    let mut code: c_int = 0;
    // SAFETY: ncclGetVersion(int*) writes one int.
    let rc = unsafe { std::mem::transmute::<*mut c_void, GetVersion>(sym)(&mut code) };
    if rc != 0 {
        return Err(format!("ncclGetVersion in {} failed with code {rc}", path.display()));
    }
    Ok(NcclLibrary { path, version: version_text(code), loaded_by_libtorch })
}

/// The NCCL series cudarc's bindings are built for (`nccl-02028`): a library of another
/// major.minor could lay its structures out differently.
pub const SERIES: (c_int, c_int) = (2, 28);

/// Make NCCL usable through cudarc, once per process: cudarc must find a library under the
/// names it tries (`libnccl.so`, `.so.13`, ...; the build links torch's `libnccl.so.2` as
/// `libnccl.so` on the binary's library path), it must be the very copy libtorch loaded (two
/// NCCLs in one process do not share state), and of the series the bindings describe. Every
/// failure is an error naming the files and paths involved, never a panic.
pub fn load() -> Result<NcclLibrary, DistError> {
    static LOADED: std::sync::OnceLock<Result<NcclLibrary, String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(load_once)
        .clone()
        .map_err(|message| DistError::Unavailable { what: "NCCL", message })
}

fn load_once() -> Result<NcclLibrary, String> {
    let torch = locate()?;
    // SAFETY: only tries dlopen on each name cudarc would use, resolving no symbol.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(format!(
            "libtorch's NCCL is {} ({SONAME}), but cudarc finds none under the names it tries \
             ({}) on this binary's library path (the build links the wheel's file as \
             libnccl.so beside the binary's RUNPATH; LD_LIBRARY_PATH may name a directory \
             with such a link instead)",
            torch.path.display(),
            cudarc::get_lib_name_candidates("nccl").join(", ")
        ));
    }
    let ours = same_object("libnccl.so", SONAME);
    if ours == Some(false) {
        return Err(format!(
            "cudarc loaded a libnccl.so that is not libtorch's {} ({SONAME}): two NCCLs in one \
             process; remove the other from LD_LIBRARY_PATH",
            torch.path.display()
        ));
    }
    let mut code: c_int = 0;
    // SAFETY: the library is present (checked above); one int is written.
    let rc = unsafe { cudarc::nccl::sys::ncclGetVersion(&mut code) };
    if rc != cudarc::nccl::sys::ncclResult_t::ncclSuccess {
        return Err(format!("ncclGetVersion failed ({rc:?}) in {}", torch.path.display()));
    }
    if (code / 10000, (code % 10000) / 100) != SERIES {
        return Err(format!(
            "{} is NCCL {}; the bindings are for {}.{}.x (torch 2.11's wheel ships 2.28.9)",
            torch.path.display(),
            version_text(code),
            SERIES.0,
            SERIES.1
        ));
    }
    Ok(NcclLibrary { version: version_text(code), ..torch })
}

/// Whether two library names resolve to the one loaded object (`None` when either is not
/// loaded).
fn same_object(a: &str, b: &str) -> Option<bool> {
    let open = |name: &str| {
        let c = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: RTLD_NOLOAD returns a handle only for a library already loaded.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        (!h.is_null()).then_some(h as usize)
    };
    Some(open(a)? == open(b)?)
}

/// NCCL's version code as text: 22809 → `2.28.9` (NCCL ≥ 2.9 codes are major·10000 +
/// minor·100 + patch).
pub fn version_text(code: c_int) -> String {
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns this thread's last error string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "no message".into()
    } else {
        unsafe { std::ffi::CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_read_as_nccl_prints_them() {
        assert_eq!(version_text(22809), "2.28.9");
        assert_eq!(version_text(21803), "2.18.3");
    }

    /// With libtorch's CUDA backend loaded (a CUDA install, GPU or not), cudarc loads the very
    /// NCCL libtorch did; on the slim install the error names the file and the names tried.
    #[test]
    fn cudarc_loads_libtorchs_nccl_or_says_why_not() {
        let loaded = mlaan_accel::load_cuda_backend() == &mlaan_accel::CudaBackend::Loaded;
        match load() {
            Ok(lib) => {
                assert!(loaded && lib.loaded_by_libtorch, "{lib:?}");
                assert!(lib.version.starts_with("2.28."), "{lib:?}");
            }
            Err(e) => {
                let e = e.to_string();
                assert!(!loaded, "libtorch_cuda.so is loaded but NCCL is not usable: {e}");
                assert!(e.starts_with("NCCL: ") && e.contains(SONAME), "{e}");
            }
        }
    }

    #[test]
    fn a_missing_nccl_is_named_with_the_path_tried() {
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        match locate() {
            Ok(lib) => assert!(lib.path.is_file() && lib.version.starts_with("2."), "{lib:?}"),
            Err(e) => {
                let path = wheel_path().expect("libtorch is loaded");
                assert!(e.contains(&path.display().to_string()), "{e}");
            }
        }
    }
}

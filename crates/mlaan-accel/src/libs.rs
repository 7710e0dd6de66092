//! The shared libraries this process has loaded, and from where: which libtorch runs (its
//! directory and version) and which copy of a library it brought in (NCCL), for `doctor` and
//! for the errors that must name a file.

use std::ffi::{c_int, c_void, CStr};
use std::path::{Path, PathBuf};

/// The path of a loaded shared object whose file name is `file_name` or starts with
/// `file_name.` (so `libnccl.so` finds `libnccl.so.2`); `None` when none is loaded.
pub fn loaded_library(file_name: &str) -> Option<PathBuf> {
    struct Search<'a> {
        name: &'a str,
        found: Option<PathBuf>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid info; `data` is the `Search` handed in below.
        let (info, search) = unsafe { (&*info, &mut *(data as *mut Search)) };
        if info.dlpi_name.is_null() {
            return 0;
        }
        // SAFETY: dlpi_name is a NUL-terminated path (empty for the executable).
        let path = unsafe { CStr::from_ptr(info.dlpi_name) }.to_string_lossy().into_owned();
        let base = Path::new(&path).file_name().and_then(|b| b.to_str()).unwrap_or("");
        let dotted = format!("{}.", search.name);
        if base == search.name || base.starts_with(&dotted) {
            search.found = Some(PathBuf::from(path));
            return 1;
        }
        0
    }
    let mut search = Search { name: file_name, found: None };
    // SAFETY: the callback only reads what the loader passes and writes into `search`.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut search as *mut Search as *mut c_void) };
    search.found
}

/// The torch directory (`.../site-packages/torch`, or a libtorch zip's root) of the libtorch
/// this process runs: the parent of the directory `libtorch_cpu.so` was loaded from.
pub fn libtorch_dir() -> Option<PathBuf> {
    let lib = loaded_library("libtorch_cpu.so")?;
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    Some(lib.parent()?.parent()?.to_path_buf())
}

/// The version of that libtorch (`2.11.0+cu130`), from its `version.py` (PyPI) or
/// `build-version` (libtorch zip).
pub fn libtorch_version() -> Option<String> {
    let dir = libtorch_dir()?;
    if let Ok(text) = std::fs::read_to_string(dir.join("version.py")) {
        return text.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("__version__")?.trim_start().strip_prefix('=')?;
            Some(rest.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        });
    }
    let text = std::fs::read_to_string(dir.join("build-version")).ok()?;
    Some(text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_libtorch_is_found_with_its_version() {
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let dir = libtorch_dir().expect("libtorch_cpu.so is loaded");
        assert!(dir.join("lib").is_dir(), "{}", dir.display());
        let v = libtorch_version().expect("a version");
        assert!(v.starts_with("2.11"), "{v}");
        assert!(loaded_library("libc.so").is_some());
        assert!(loaded_library("libnot-a-library-anyone-has.so").is_none());
    }
}

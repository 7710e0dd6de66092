// Build-script code shared by the packages that link libtorch (the root package `mlaan-pipe`,
// `mlaan-models`, `mlaan-engine`, `mlaan-train`, `mlaan-dist`): each one's build.rs
// `include!`s this file and calls `libtorch_build()` from its `main` (mlaan-dist then also
// compiles its C++ bridge against `libtorch_dir()`).
//
// 1. Checks that the libtorch named by `LIBTORCH` is 2.11.x, the version tch/torch-sys 0.24.0
//    are written against. torch-sys only checks a `build-version` file, which a PyPI torch
//    does not have, so without this a wrong torch fails late with C++ or linker errors.
// 2. Bakes libtorch's lib directory into the RUNPATH of this package's binaries, tests and
//    benches, so they run without LD_LIBRARY_PATH.
// 3. Gives cudarc's NCCL loader the NCCL that libtorch uses: cudarc looks for `libnccl.so`
//    (and `.so.13`, `.so.12`, ...), the torch wheel ships `libnccl.so.2` only. A directory of
//    this package's build output holds a link `libnccl.so` to the wheel's file, and is in the
//    RUNPATH too; the dynamic loader recognises the linked file as the copy libtorch_cuda.so
//    already loaded. On a CPU-only install the link dangles, harmlessly, until set-up installs
//    torch's CUDA libraries.
//
// `LIBTORCH` normally comes from `.cargo/config.toml` (`.libtorch`, a symlink made by
// `make setup`); an environment variable of that name takes precedence (docs/setup.md).

const EXPECTED_SERIES: &str = "2.11";

fn libtorch_build() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_BYPASS_VERSION_CHECK");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        check_libtorch(&dir);
    }
    // torch-sys (`links = "tch"`) exports the lib directory it linked against.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        link_nccl(std::path::Path::new(&dir));
    }
}

/// Point `$OUT_DIR/nccl/libnccl.so` at the torch wheel's NCCL (`site-packages/nvidia/nccl/lib/
/// libnccl.so.2`, beside `site-packages/torch/lib`) and put the directory on the RUNPATH.
fn link_nccl(torch_lib: &std::path::Path) {
    let Some(out) = std::env::var_os("OUT_DIR") else { return };
    let torch_lib = std::fs::canonicalize(torch_lib).unwrap_or_else(|_| torch_lib.to_path_buf());
    let Some(site) = torch_lib.parent().and_then(|t| t.parent()) else { return };
    let target = site.join("nvidia/nccl/lib/libnccl.so.2");
    let dir = std::path::Path::new(&out).join("nccl");
    let link = dir.join("libnccl.so");
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        let _ = std::fs::remove_file(&link);
        if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
            println!("cargo:warning=cannot link {} to {}: {e}", link.display(), target.display());
            return;
        }
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
}

/// The libtorch directory `LIBTORCH` names (relative to the workspace root when relative).
#[allow(dead_code)] // only mlaan-dist's build script uses it directly
fn libtorch_dir() -> Option<std::path::PathBuf> {
    let value = std::env::var("LIBTORCH").ok()?;
    let given = std::path::PathBuf::from(value);
    Some(if given.is_absolute() { given } else { workspace_root().join(given) })
}

fn check_libtorch(value: &str) {
    let dir = libtorch_dir().expect("LIBTORCH is set");
    if std::env::var_os("LIBTORCH_BYPASS_VERSION_CHECK").is_some() {
        return;
    }
    if !dir.is_dir() {
        fail(&format!("LIBTORCH is {value}, but {} is not a directory.", dir.display()));
    }
    // Watch only files that exist: a missing one would re-run this script on every build.
    let version_py = dir.join("version.py");
    let build_version = dir.join("build-version");
    if version_py.is_file() {
        println!("cargo:rerun-if-changed={}", version_py.display());
    } else if build_version.is_file() {
        // A libtorch zip has `build-version` instead, which torch-sys itself checks.
        println!("cargo:rerun-if-changed={}", build_version.display());
        return;
    } else {
        fail(&format!(
            "{} has neither version.py (PyPI torch) nor build-version (libtorch zip).",
            dir.display()
        ));
    }
    let text = std::fs::read_to_string(&version_py).unwrap_or_default();
    match parse_version(&text) {
        Some(v) if is_expected(&v) => {}
        Some(v) => fail(&format!(
            "libtorch at {} is version {v}, but tch 0.24.0 needs libtorch {EXPECTED_SERIES}.x.",
            dir.display()
        )),
        None => fail(&format!(
            "cannot read the torch version from {} (no `__version__ = '...'` line).",
            version_py.display()
        )),
    }
}

/// `__version__ = '2.11.0+cu130'` → `2.11.0+cu130`.
fn parse_version(version_py: &str) -> Option<String> {
    version_py.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("__version__")?;
        let rest = rest.trim_start().strip_prefix('=')?.trim();
        let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let inner = &rest[1..];
        Some(inner[..inner.find(quote)?].to_string())
    })
}

/// `2.11.0`, `2.11.0+cu130`, `2.11.1+cpu` are all 2.11.x.
fn is_expected(version: &str) -> bool {
    let release = version.split('+').next().unwrap_or(version);
    release.split('.').take(2).collect::<Vec<_>>().join(".") == EXPECTED_SERIES
}

/// The nearest ancestor of this package whose Cargo.toml declares `[workspace]`.
fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    manifest
        .ancestors()
        .find(|d| {
            std::fs::read_to_string(d.join("Cargo.toml"))
                .map(|t| t.lines().any(|l| l.trim() == "[workspace]"))
                .unwrap_or(false)
        })
        .unwrap_or(&manifest)
        .to_path_buf()
}

fn fail(problem: &str) -> ! {
    eprintln!();
    eprintln!("error: {problem}");
    eprintln!(
        "  Run `make setup`: it installs torch 2.11.0 into .venv and points .libtorch at it."
    );
    eprintln!(
        "  Or set LIBTORCH to the `torch` directory of a torch 2.11 install (docs/setup.md)."
    );
    eprintln!("  (LIBTORCH_BYPASS_VERSION_CHECK=1 skips this check, at your own risk.)");
    eprintln!();
    std::process::exit(1);
}

// Compiles cpp/c10d_bridge.cpp against the c10d headers of the libtorch that `LIBTORCH` names
// (as torch-sys compiles its own C++: C++17, the cxx11 ABI) and Gloo's headers, which the
// PyPI wheel lacks and Debian's libgloo-dev provides (`make setup` installs it). No Gloo
// library is linked: libtorch_cpu.so carries Gloo's code.
include!("../../build/libtorch.rs");

fn main() {
    libtorch_build();
    println!("cargo:rerun-if-changed=cpp/c10d_bridge.cpp");
    println!("cargo:rerun-if-changed=../../build/bridge_guard.h");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    let Some(torch) = libtorch_dir() else {
        fail("LIBTORCH is not set (it normally comes from .cargo/config.toml).");
    };
    let gloo = std::env::var("GLOO_INCLUDE").unwrap_or_else(|_| "/usr/include".into());
    if !std::path::Path::new(&gloo).join("gloo/config.h").is_file() {
        eprintln!();
        eprintln!("error: Gloo's headers are missing ({gloo}/gloo/config.h not found).");
        eprintln!("  mlaan-dist compiles c10d's ProcessGroupGloo header, which includes them.");
        eprintln!("  Run `make setup` (it installs Debian's libgloo-dev), or");
        eprintln!("  `sudo apt-get install libgloo-dev`, or set GLOO_INCLUDE to their directory.");
        eprintln!();
        std::process::exit(1);
    }
    cc::Build::new()
        .cpp(true)
        .file("cpp/c10d_bridge.cpp")
        .include(concat!(env!("CARGO_MANIFEST_DIR"), "/../../build"))
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DUSE_C10D_GLOO")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("mlaan_c10d");
}

// Compiles cpp/accel_bridge.cpp against the headers of the libtorch that `LIBTORCH` names (as
// torch-sys compiles its own C++: C++17, the cxx11 ABI). It uses only device-generic c10/ATen
// interfaces (autocast, c10::Stream/Event, the device allocator), so it needs no CUDA headers
// and builds the same on a CPU-only machine; the CUDA parts are reached at run time only.
include!("../../build/libtorch.rs");

fn main() {
    libtorch_build();
    println!("cargo:rerun-if-changed=cpp/accel_bridge.cpp");
    println!("cargo:rerun-if-changed=../../build/bridge_guard.h");
    let Some(torch) = libtorch_dir() else {
        fail("LIBTORCH is not set (it normally comes from .cargo/config.toml).");
    };
    cc::Build::new()
        .cpp(true)
        .file("cpp/accel_bridge.cpp")
        .include(concat!(env!("CARGO_MANIFEST_DIR"), "/../../build"))
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("mlaan_accel");
}

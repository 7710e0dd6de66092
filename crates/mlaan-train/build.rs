fn main() {
    // Bake libtorch's directory into the binary's RUNPATH so it runs without LD_LIBRARY_PATH.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

// libtorch version check and RUNPATH; shared with crates/mlaan-{models,engine,train}/build.rs.
include!("build/libtorch.rs");

fn main() {
    libtorch_build();
}

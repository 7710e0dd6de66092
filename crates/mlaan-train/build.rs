// libtorch version check and RUNPATH; shared with the root package's build.rs.
include!("../../build/libtorch.rs");

fn main() {
    libtorch_build();
}

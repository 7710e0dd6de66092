// libtorch version check and RUNPATH; shared with crates/mlaan-{models,train}/build.rs.
include!("build/libtorch.rs");

//! Data-parallel replicas as separate processes on loopback, rendezvous through the
//! environment torchrun sets (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, ...):
//! exactness against one process that accumulates the same micro-batches, and the faults a
//! multi-process run must turn into prompt, clear errors instead of hangs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// A port nobody listens on now (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// ResNet-8 K=3 on 16×16 synthetic images, two CPU stages, placed by FLOPs (a measured
/// placement could differ between runs; the maths does not depend on it either way).
fn args(method: &str, batch: usize, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--dataset",
        "synthetic",
        "--arch",
        "resnet8",
        "--method",
        method,
        "--k",
        "3",
        "--schedule",
        "sync",
        "--devices",
        "cpu,cpu",
        "--epochs",
        "1",
        "--set",
        "pipeline.placement=flops",
        "--set",
        "data.synthetic_size=16",
        "--set",
        "pipeline.intra_op_threads=1",
        "--set",
        "data.workers=1",
        "--set",
        "train.log_every=1",
        "--set",
        "distributed.timeout_s=30",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(["--batch-size".into(), batch.to_string(), "--out".into(), out.display().to_string()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn command(a: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"));
    c.args(a).env("MLAAN_LOG", "info").env_remove("MLAAN_DATA_DIR");
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    {
        c.env_remove(k);
    }
    c
}

/// Rank `rank` of `world` on this machine, as torchrun would start it.
fn rank_command(a: &[String], rank: usize, world: usize, port: u16) -> Command {
    let mut c = command(a);
    c.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    c
}

/// Processes that are killed if the test ends (or fails) before they do: no orphans.
struct Ranks(Vec<Child>);

impl Ranks {
    fn start(world: usize, port: u16, args_of: impl Fn(usize) -> Vec<String>) -> Ranks {
        Ranks(
            (0..world)
                .map(|r| {
                    rank_command(&args_of(r), r, world, port)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }

    /// Wait for every rank, at most `limit` in all (then kill them and fail).
    fn wait(mut self, limit: Duration) -> Vec<Output> {
        let t = Instant::now();
        loop {
            if self.0.iter_mut().all(|c| c.try_wait().unwrap().is_some()) {
                break;
            }
            assert!(t.elapsed() < limit, "ranks still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::mem::take(&mut self.0).into_iter().map(|c| c.wait_with_output().unwrap()).collect()
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_all_ok(outs: &[Output]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed:\n{}", stderr(o));
    }
}

/// Every tensor of a run's last checkpoint, by file and name.
fn checkpoint_tensors(run: &Path) -> Vec<(String, Tensor)> {
    let ckpt = run.join("ckpt");
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(&ckpt).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    let dir = dirs.pop().unwrap_or_else(|| panic!("no checkpoint in {}", ckpt.display()));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut v = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let mut t = Tensor::read_safetensors(&f).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        v.extend(t.into_iter().map(|(n, t)| (format!("{name}:{n}"), t)));
    }
    v
}

/// BatchNorm's running statistics are per replica (as under DDP): each replica's are of its
/// own micro-batch, where one process's accumulation updates them micro-batch after
/// micro-batch. They never enter a gradient, so everything trained is still comparable.
fn is_batchnorm_buffer(name: &str) -> bool {
    name.contains("running_mean") || name.contains("running_var") || name.contains("num_batches")
}

/// 2 processes × 2 CPU stages with batch 8 each against 1 process with batch 16 in 2
/// micro-batches (rank r's batch is micro-batch r, see the loader's sharding), same seed, 20
/// steps: every trained tensor (backbone, heads, LAM copies, EMA twins, momentum) agrees.
#[test]
fn two_replicas_equal_one_process_accumulating_two_micro_batches() {
    for method in ["e2e", "dgl", "infopro", "mlaan-dgl", "mlaan-infopro"] {
        let tmp = tempfile::tempdir().unwrap();
        let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
        let samples = ["--set", "data.synthetic_samples=320"];
        let mut reference = args(method, 16, &one, &samples);
        reference.extend(["--set".into(), "pipeline.micro_batches=2".into()]);
        let o = command(&reference).output().unwrap();
        assert!(o.status.success(), "{method} reference failed:\n{}", stderr(&o));
        let port = free_port();
        let outs = Ranks::start(2, port, |_| args(method, 8, &two, &samples))
            .wait(Duration::from_secs(300));
        assert_all_ok(&outs);

        let (a, b) = (checkpoint_tensors(&one), checkpoint_tensors(&two));
        assert_eq!(a.len(), b.len(), "{method}: different checkpoint contents");
        let mut compared = 0;
        let mut worst = 0f64;
        for ((n1, t1), (n2, t2)) in a.iter().zip(&b) {
            assert_eq!(n1, n2, "{method}");
            if is_batchnorm_buffer(n1) || !t1.is_floating_point() {
                continue;
            }
            let diff = (t1 - t2).abs().max().double_value(&[]);
            let scale = t1.abs().max().double_value(&[]).max(1.0);
            worst = worst.max(diff / scale);
            assert!(diff <= 1e-4 * scale, "{method}: `{n1}` differs by {diff:e} (scale {scale})");
            compared += 1;
        }
        assert!(compared > 30, "{method}: only {compared} tensors compared");
        eprintln!("{method}: {compared} tensors agree, worst relative difference {worst:e}");

        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(two.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["world_size"], 2);
        assert_eq!(summary["global_batch_size"], 16);
        assert_eq!(summary["steps"], 20);
        assert_eq!(summary["ranks"].as_array().map(Vec::len), Some(2));
    }
}

/// Ranks started with different configs fail at start, naming the key and both values.
#[test]
fn mismatched_configs_fail_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let outs = Ranks::start(2, free_port(), |r| {
        let lr = if r == 0 { "optim.lr=0.1" } else { "optim.lr=0.2" };
        args("dgl", 8, &run, &["--set", lr])
    })
    .wait(Duration::from_secs(120));
    for (r, o) in outs.iter().enumerate() {
        let err = stderr(o);
        assert!(!o.status.success(), "rank {r} started anyway");
        assert!(err.contains("optim.lr = 0.1 on rank 0 but 0.2 on rank 1"), "rank {r}:\n{err}");
    }
}

/// Rank 0 cannot serve the store on a port already in use: the error names the port.
#[test]
fn a_busy_port_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let o =
        rank_command(&args("dgl", 8, &tmp.path().join("run"), &[]), 0, 2, port).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains(&format!("port {port}")), "{err}");
}

/// WORLD_SIZE > 1 without MASTER_ADDR is a clear error, not a hang.
#[test]
fn a_world_without_master_address_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = command(&args("dgl", 8, &tmp.path().join("run"), &[]))
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("MASTER_ADDR is not set"), "{err}");
}

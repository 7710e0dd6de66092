//! Data-parallel replicas as separate processes on loopback, rendezvous through the
//! environment torchrun sets (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, ...):
//! exactness against one process that accumulates the same micro-batches, and the faults a
//! multi-process run must turn into prompt, clear errors instead of hangs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};
use tch::Tensor;

/// A port nobody listens on now (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// ResNet-8 K=3 on 16×16 synthetic images, two CPU stages, placed by FLOPs (a measured
/// placement could differ between runs; the maths does not depend on it either way).
///
/// With `MLAAN_TEST_NCCL=1` (the GPU check runs these tests so on a machine with two GPUs)
/// the devices are `--gpus 0,1` and the replicas reduce with NCCL: each of two ranks takes
/// one GPU (one stage), a single process both (two stages).
fn args(method: &str, batch: usize, out: &Path, extra: &[&str]) -> Vec<String> {
    let devices: &[&str] = if nccl() {
        &["--gpus", "0,1", "--set", "distributed.backend=\"nccl\""]
    } else {
        &["--devices", "cpu,cpu"]
    };
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
    ]
    .iter()
    .chain(devices)
    .chain(&[
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
    ])
    .map(|s| s.to_string())
    .collect();
    v.extend(["--batch-size".into(), batch.to_string(), "--out".into(), out.display().to_string()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Whether the replicas run on GPUs with NCCL (see [`args`]).
fn nccl() -> bool {
    std::env::var("MLAAN_TEST_NCCL").is_ok_and(|v| v == "1")
}

/// The binary under test: this build's, or `MLAAN_PIPE` (a packed binary on a GPU machine).
fn command(a: &[String]) -> Command {
    let bin =
        std::env::var("MLAAN_PIPE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mlaan-pipe").into());
    let mut c = Command::new(bin);
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

/// Processes that are killed if the test ends (or fails) before they do: no orphans. Their
/// output goes to files (a pipe nobody reads would fill and block a rank that logs a lot).
struct Ranks {
    children: Vec<Child>,
    logs: tempfile::TempDir,
}

/// How a rank ended.
struct Ended {
    status: std::process::ExitStatus,
    stderr: String,
    /// When it ended, measured from the start of `Ranks::wait`.
    after: Duration,
}

impl Ranks {
    fn start(world: usize, port: u16, args_of: impl Fn(usize) -> Vec<String>) -> Ranks {
        Ranks::start_with(world, port, &[], args_of)
    }

    /// As `start`, with more environment variables for every rank.
    fn start_with(
        world: usize,
        port: u16,
        env: &[(&str, &str)],
        args_of: impl Fn(usize) -> Vec<String>,
    ) -> Ranks {
        let logs = tempfile::tempdir().unwrap();
        let children = (0..world)
            .map(|r| {
                let file = |name: &str| std::fs::File::create(logs.path().join(name)).unwrap();
                rank_command(&args_of(r), r, world, port)
                    .envs(env.iter().copied())
                    .stdout(file(&format!("{r}.out")))
                    .stderr(file(&format!("{r}.err")))
                    .spawn()
                    .unwrap()
            })
            .collect();
        Ranks { children, logs }
    }

    fn pid(&self, rank: usize) -> u32 {
        self.children[rank].id()
    }

    /// Wait for every rank, at most `limit` in all (then kill them and fail).
    fn wait(mut self, limit: Duration) -> Vec<Ended> {
        let all: Vec<usize> = (0..self.children.len()).collect();
        self.wait_for(&all, limit)
    }

    /// Wait for the ranks `which`, at most `limit` in all; the others are killed on drop.
    fn wait_for(&mut self, which: &[usize], limit: Duration) -> Vec<Ended> {
        let t = Instant::now();
        let mut ended: Vec<Option<(std::process::ExitStatus, Duration)>> = vec![None; which.len()];
        while ended.iter().any(Option::is_none) {
            for (&r, e) in which.iter().zip(&mut ended) {
                if e.is_none() {
                    *e = self.children[r].try_wait().unwrap().map(|s| (s, t.elapsed()));
                }
            }
            assert!(t.elapsed() < limit, "ranks {which:?} still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        which
            .iter()
            .zip(ended)
            .map(|(&r, e)| {
                let (status, after) = e.unwrap();
                let stderr =
                    std::fs::read_to_string(self.logs.path().join(format!("{r}.err"))).unwrap();
                Ended { status, stderr, after }
            })
            .collect()
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Send `signal` (a `kill` name: KILL, TERM) to `pid`.
fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(ok.success(), "kill -{signal} {pid} failed");
}

/// Wait until rank 0 has logged `steps` training steps in `run` (so a fault lands
/// mid-epoch, not during start-up).
fn wait_for_steps(run: &Path, steps: usize) {
    let t = Instant::now();
    let metrics = run.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.matches("\"train\"").count()) < steps {
        assert!(t.elapsed() < Duration::from_secs(120), "no {steps} steps in {}", run.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_all_ok(outs: &[Ended]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed:\n{}", o.stderr);
    }
}

/// A finished run's summary.json.
fn summary_of(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
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
    for method in
        ["e2e", "dgl", "infopro", "auglocal", "mlaan-dgl", "mlaan-infopro", "mlaan-auglocal"]
    {
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

        let summary = summary_of(&two);
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
        let err = &o.stderr;
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

/// A long run: enough steps that a fault lands mid-epoch.
fn long_run(run: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = args("dgl", 8, run, &["--set", "distributed.timeout_s=10"]);
    set_epochs(&mut v, 40);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn set_epochs(args: &mut [String], epochs: usize) {
    let at = args.iter().position(|a| a == "--epochs").unwrap();
    args[at + 1] = epochs.to_string();
}

/// `kill -9` of either rank mid-epoch ends the other within the timeout, with an error that
/// names the module's group and the peer that went away (rank 0 also serves the store: its
/// death is told apart from a worker's).
#[test]
fn a_killed_rank_ends_the_other_promptly_naming_it() {
    for (victim, blame) in [(1, "peer rank 1 stopped"), (0, "peer rank 0 is gone")] {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let ranks = Ranks::start(2, free_port(), |_| long_run(&run, &[]));
        wait_for_steps(&run, 20);
        signal(ranks.pid(victim), "KILL");
        let outs = ranks.wait(Duration::from_secs(60));
        let survivor = &outs[1 - victim];
        assert!(!survivor.status.success(), "rank {} did not fail", 1 - victim);
        assert!(survivor.stderr.contains("replica group"), "{}", survivor.stderr);
        assert!(survivor.stderr.contains(blame), "{}", survivor.stderr);
    }
}

/// A rank that hangs (stopped, alive) makes the other fail after `distributed.timeout_s`.
#[test]
fn a_hung_rank_times_the_other_out() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let ranks = Ranks::start(2, free_port(), |_| long_run(&run, &[]));
    wait_for_steps(&run, 20);
    let mut ranks = ranks;
    signal(ranks.pid(1), "STOP");
    // Rank 1 stays stopped until `ranks` is dropped (SIGKILL ends a stopped process too).
    let rank0 = ranks.wait_for(&[0], Duration::from_secs(60)).remove(0);
    assert!(!rank0.status.success());
    assert!(rank0.after >= Duration::from_secs(9), "failed before the timeout: {:?}", rank0.after);
    assert!(rank0.stderr.contains("Timed out"), "{}", rank0.stderr);
    assert!(rank0.stderr.contains("peer rank 1 stopped"), "{}", rank0.stderr);
}

/// A run of 3 short epochs (40 steps each at a global batch of 16).
fn short_run(run: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = args("dgl", 8, run, &["--set", "data.synthetic_samples=640"]);
    set_epochs(&mut v, 3);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// SIGTERM to `signalled` ranks mid-run: every rank exits 75 at one agreed step, and rank 0
/// wrote that step's checkpoint, complete. Returns the step.
fn stop_by_sigterm(run: &Path, signalled: &[usize]) -> String {
    let ranks = Ranks::start(2, free_port(), |_| short_run(run, &[]));
    wait_for_steps(run, 10);
    for &r in signalled {
        signal(ranks.pid(r), "TERM");
    }
    let outs = ranks.wait(Duration::from_secs(120));
    let mut steps = Vec::new();
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(o.status.code(), Some(75), "rank {r}:\n{}", o.stderr);
        let line = o.stderr.lines().find(|l| l.starts_with("interrupted at step")).unwrap();
        steps.push(line.split_whitespace().nth(3).unwrap().trim_end_matches(';').to_string());
    }
    assert_eq!(steps[0], steps[1], "ranks stopped at different steps");
    let ckpt = run.join("ckpt").join(format!("step-{:0>8}", steps[0]));
    assert!(ckpt.join("COMPLETE").exists(), "{} incomplete", ckpt.display());
    steps.remove(0)
}

/// SIGTERM to both ranks (as SLURM signals every task) leaves one consistent checkpoint, and
/// `--resume auto` with both ranks finishes the run from it.
#[test]
fn sigterm_to_both_leaves_one_checkpoint_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let step = stop_by_sigterm(&run, &[0, 1]);
    let outs = Ranks::start(2, free_port(), |_| short_run(&run, &["--resume", "auto"]))
        .wait(Duration::from_secs(300));
    assert_all_ok(&outs);
    assert!(outs[0].stderr.contains(&format!("at step {step}")), "{}", outs[0].stderr);
    let summary = summary_of(&run);
    assert_eq!(summary["steps"], 3 * 640 / 16);
}

/// SIGTERM to one rank only (a worker's, not the one that writes) stops both the same way.
#[test]
fn sigterm_to_one_rank_stops_both_at_one_step() {
    let tmp = tempfile::tempdir().unwrap();
    stop_by_sigterm(&tmp.path().join("run"), &[1]);
}

/// Resuming with another number of ranks needs the same global batch: at another one a step
/// covers other images, which the error says.
#[test]
fn resume_at_another_global_batch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    stop_by_sigterm(&run, &[0, 1]);
    let o = command(&short_run(&run, &["--resume", "auto"])).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("global batch of 16 (2 rank(s)) but this run's is 8"), "{err}");
    let mut same_global = short_run(&run, &["--resume", "auto"]);
    let at = same_global.iter().position(|a| a == "--batch-size").unwrap();
    same_global[at + 1] = "16".into();
    let o = command(&same_global).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The processes whose parent is `pid` (from /proc: no tool needed).
fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) == Some(pid) {
            v.push(child);
        }
    }
    v
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').map_or(0, |i| i + 1)..].trim_start().starts_with('Z'))
}

/// `mlaan-pipe launch --nproc-per-node 2` running one training run, its output in files.
struct Launched {
    tmp: tempfile::TempDir,
    run: PathBuf,
    child: Child,
}

impl Launched {
    /// Start `launch` on the run `run_args` makes of the run directory.
    fn start(run_args: fn(&Path, &[&str]) -> Vec<String>) -> Launched {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let file = |name: &str| std::fs::File::create(tmp.path().join(name)).unwrap();
        let child = command(&["launch".into(), "--nproc-per-node".into(), "2".into(), "--".into()])
            .args(run_args(&run, &[]))
            .stdout(file("launch.out"))
            .stderr(file("launch.err"))
            .spawn()
            .unwrap();
        Launched { tmp, run, child }
    }

    /// Wait at most `limit` for `launch` to end (then kill it and fail): its status and
    /// stderr.
    fn wait(&mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("still running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, std::fs::read_to_string(self.tmp.path().join("launch.err")).unwrap())
    }
}

/// A test that fails does not leave `launch` behind (its replicas die with it).
impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `launch` starts the replicas as torchrun would: the run is the same 2-rank run.
#[test]
fn launch_runs_replicas_like_torchrun() {
    let mut l = Launched::start(short_run);
    let (status, err) = l.wait(Duration::from_secs(300));
    assert!(status.success(), "{err}");
    let summary = summary_of(&l.run);
    assert_eq!(summary["world_size"], 2);
    assert_eq!(summary["steps"], 3 * 640 / 16);
}

/// One replica killed: `launch` stops the other, exits non-zero, and leaves no process behind.
#[test]
fn launch_stops_every_rank_when_one_dies() {
    let mut l = Launched::start(long_run);
    wait_for_steps(&l.run, 20);
    let ranks = children_of(l.child.id());
    assert_eq!(ranks.len(), 2, "launch started {ranks:?}");
    signal(ranks[1], "KILL");
    let (status, err) = l.wait(Duration::from_secs(60));
    assert!(!status.success(), "{err}");
    assert!(err.contains("failed (killed by signal 9)"), "{err}");
    assert!(ranks.iter().all(|&p| !alive(p)), "a rank outlived launch: {ranks:?}");
}

/// SIGTERM to `launch` reaches every replica once: they stop at one step, checkpoint, and
/// `launch` exits 75 as they do.
#[test]
fn launch_forwards_sigterm() {
    let mut l = Launched::start(long_run);
    wait_for_steps(&l.run, 20);
    signal(l.child.id(), "TERM");
    let (status, err) = l.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(75), "{err}");
    assert_eq!(err.matches("interrupted at step").count(), 2, "{err}");
}

/// `bench` runs `ddp` and `CASE*R` as that many processes beside the in-process cases, and
/// reports each stage's all-reduced bytes per step: for ddp exactly the model's gradients.
#[test]
fn bench_measures_replicated_cases_and_their_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let o = command(&[])
        .args(["bench", "--arch", "resnet8", "--k", "2", "--devices", "cpu,cpu"])
        .args(["--batch-size", "8", "--cases", "e2e,ddp,dgl:sync*2", "--warmup", "1"])
        .args(["--steps", "3", "--repeats", "1", "--set", "pipeline.intra_op_threads=1"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["e2e", "ddp", "dgl sync ×2"]);
    assert_eq!(cases[0]["replicas"], 1);
    assert_eq!(cases[0]["stages"][0]["allreduce_bytes_per_step"], 0.0);
    for c in &cases[1..] {
        assert_eq!(c["replicas"], 2, "{c}");
        assert!(c["images_per_s"][0].as_f64().unwrap() > 0.0, "{c}");
        for s in c["stages"].as_array().unwrap() {
            assert!(s["allreduce_bytes_per_step"].as_f64().unwrap() > 0.0, "{c}");
        }
    }
    // ResNet-8's e2e gradients (float32) plus the presence flags, once per step.
    let ddp_bytes = cases[1]["stages"][0]["allreduce_bytes_per_step"].as_f64().unwrap();
    let params_bytes = 4.0 * 78_042.0;
    assert!((ddp_bytes - params_bytes).abs() / params_bytes < 0.01, "{ddp_bytes}");
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("### Data-parallel replicas"), "{md}");
}

/// Under torchrun's elastic agent (`TORCHELASTIC_USE_AGENT_STORE=True`) the agent serves the
/// store and rank 0 connects like every other rank: here the test serves it, as the agent
/// would, and the two ranks train one run through it.
#[test]
fn ranks_use_the_agent_store_under_torchrun() {
    let store = mlaan_dist::Store::serve("127.0.0.1", 0, Duration::from_secs(60)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = [("TORCHELASTIC_USE_AGENT_STORE", "True")];
    let outs = Ranks::start_with(2, store.port(), &agent, |_| short_run(&run, &[]))
        .wait(Duration::from_secs(300));
    assert_all_ok(&outs);
    assert_eq!(summary_of(&run)["world_size"], 2);
    drop(store);
}

/// With replicas every rank evaluates its share of the test set after taking rank 0's
/// BatchNorm statistics, and the counts are summed: the result is rank 0's saved model on the
/// whole set, which `mlaan-pipe eval` in one process reproduces.
#[test]
fn sharded_evaluation_is_rank_0s_model_on_the_whole_test_set() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // 10 steps: short enough that the accuracy is not 1 (a loss to compare, too).
    let outs = Ranks::start(2, free_port(), |_| {
        args("dgl", 8, &run, &["--set", "data.synthetic_samples=160"])
    })
    .wait(Duration::from_secs(300));
    assert_all_ok(&outs);
    let summary = summary_of(&run);
    let o = command(&["eval".into(), "--model".into(), run.display().to_string(), "--json".into()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let one: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(one["test_accuracy"], summary["test_accuracy"], "{one} vs {summary}");
    let (a, b) = (one["test_loss"].as_f64().unwrap(), summary["test_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "test loss {a} alone, {b} sharded");
}

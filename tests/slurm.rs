//! The batch scripts on a real SLURM: `deploy/slurm/local_cluster.sh` starts munged, slurmctld
//! and slurmd on this machine under a temporary directory, the tests submit through `sbatch`
//! and watch the jobs through `scontrol`, and the cluster stops when the test ends. Skipped,
//! saying why, where SLURM is not installed (`scripts/setup.sh --dev` installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn installed() -> bool {
    ["munged", "slurmctld", "slurmd", "sbatch"].iter().all(|t| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("PATH=$PATH:/usr/sbin command -v {t}"))
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A running one-machine cluster; stopped on drop. One at a time (the machine has few cores,
/// and every cluster numbers its jobs from 1).
struct Cluster {
    dir: tempfile::TempDir,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static CLUSTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Cluster {
    fn start() -> Option<Cluster> {
        if !installed() {
            eprintln!("note: SLURM (slurmctld, slurmd, munge) is not installed, skipping");
            return None;
        }
        let guard = CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(root().join("deploy/slurm/local_cluster.sh"))
            .arg("start")
            .arg(dir.path().join("cluster"))
            .output()
            .unwrap();
        assert!(o.status.success(), "cluster did not start:\n{}", text(&o));
        Some(Cluster { dir, _one_at_a_time: guard })
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("cluster/slurm.conf")
    }

    /// A SLURM client command against this cluster, from the repository root, with none of
    /// the caller's SLURM variables.
    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        for (k, _) in std::env::vars() {
            if k.starts_with("SLURM_") || k.starts_with("SBATCH_") {
                c.env_remove(k);
            }
        }
        c.env("SLURM_CONF", self.conf()).current_dir(root());
        c
    }

    /// Submit `multi_node.sbatch` as 2 tasks on the one node, CPU devices; the job id.
    fn submit(&self, run: &Path, trainer: &str) -> String {
        let log = self.dir.path().join("job-%j.out");
        let o = self
            .command("sbatch")
            .args(["--parsable", "--nodes=1", "--ntasks-per-node=2", "--gres=none"])
            .args(["--cpus-per-task=1", "--mem=1G"])
            .arg(format!("--output={}", log.display()))
            .arg("deploy/slurm/multi_node.sbatch")
            .env("RUN_DIR", run)
            .env("DEVICES", "cpu,cpu")
            .env("MLAAN_PIPE", env!("CARGO_BIN_EXE_mlaan-pipe"))
            .env("CONFIG", "configs/default.toml")
            .env("EXTRA_ARGS", trainer)
            // The rendezvous port would be 15000 + job id: free for sure is better in a test.
            .env("MASTER_PORT", free_port().to_string())
            .output()
            .unwrap();
        assert!(o.status.success(), "sbatch failed:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `scontrol show job` fields of `job`.
    fn job(&self, job: &str) -> String {
        text(&self.command("scontrol").args(["show", "job", "-o", job]).output().unwrap())
    }

    fn state(&self, job: &str) -> String {
        let info = self.job(job);
        field(&info, "JobState").unwrap_or_default()
    }

    /// Wait until `job` has finished (any final state); returns that state.
    fn wait(&self, job: &str, limit: Duration, mut each: impl FnMut(&str)) -> String {
        let t = Instant::now();
        loop {
            let s = self.state(job);
            if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"].contains(&s.as_str()) {
                return s;
            }
            each(&s);
            assert!(t.elapsed() < limit, "job {job} still {s} after {limit:?}:\n{}", self.log(job));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The job's output, then what the controller and the node logged about it last.
    fn log(&self, job: &str) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let tail = |t: String| {
            t.lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        let logs = self.dir.path().join("cluster/log");
        format!(
            "{}\n--- scontrol show job: {}\n--- slurmctld.log:\n{}\n--- slurmd.log:\n{}",
            read(self.dir.path().join(format!("job-{job}.out"))),
            self.job(job),
            tail(read(logs.join("slurmctld.log"))),
            tail(read(logs.join("slurmd.log")))
        )
    }

    /// Whether the node is idle (the last job's clean-up done).
    fn node_idle(&self) -> bool {
        let o = self.command("sinfo").args(["-h", "-o", "%t"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim() == "idle"
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(root().join("deploy/slurm/local_cluster.sh"))
            .arg("stop")
            .arg(self.dir.path().join("cluster"))
            .output();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn field(info: &str, key: &str) -> Option<String> {
    info.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(String::from))
}

fn trainer_args(epochs: usize, samples: usize) -> String {
    format!(
        "--dataset synthetic --arch resnet8 --k 2 --epochs {epochs} --batch-size 8 \
         --set data.synthetic_size=16 --set data.synthetic_samples={samples} \
         --set data.workers=1 --set train.log_every=1 --set distributed.timeout_s=60"
    )
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// A 2-task job of `multi_node.sbatch` through `sbatch`: `srun` starts both replicas, they
/// meet through SLURM's variables and finish one run.
#[test]
fn a_two_task_job_trains_two_replicas() {
    let Some(cluster) = Cluster::start() else { return };
    let run = cluster.dir.path().join("run");
    let job = cluster.submit(&run, &trainer_args(1, 640));
    let state = cluster.wait(&job, Duration::from_secs(300), |_| {});
    assert_eq!(state, "COMPLETED", "{}", cluster.log(&job));
    let s = summary(&run);
    assert_eq!(s["world_size"], 2, "{}", cluster.log(&job));
    assert_eq!(s["steps"], 640 / 16);
}

/// USR1 to the batch shell (what `--signal=B:USR1@600` sends before the time limit): every
/// task checkpoints at one step, the job requeues itself, and its second start resumes from
/// that checkpoint and finishes.
#[test]
fn a_requeued_job_resumes_from_its_checkpoint() {
    let Some(cluster) = Cluster::start() else { return };
    let run = cluster.dir.path().join("run");
    let job = cluster.submit(&run, &trainer_args(3, 2048));
    let metrics = run.join("metrics.jsonl");
    let t = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 20 {
        assert!(t.elapsed() < Duration::from_secs(120), "no steps:\n{}", cluster.log(&job));
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = cluster.command("scancel").args(["--batch", "--signal=USR1", &job]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut released = false;
    let mut requeued_at: Option<Instant> = None;
    let state = cluster.wait(&job, Duration::from_secs(400), |s| {
        // SLURM holds a requeued job back for a while; start it sooner instead. Not at once:
        // slurmd refuses a batch job started again within a moment of its cancellation ("Job
        // credential revoked"), which is what the hold protects against.
        if s != "PENDING" || released {
            return;
        }
        if requeued_at.is_none() && field(&cluster.job(&job), "Restarts").is_some_and(|r| r != "0")
        {
            requeued_at = Some(Instant::now());
        }
        if requeued_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(3)) && cluster.node_idle()
        {
            let _ = cluster
                .command("scontrol")
                .args(["update", &format!("JobId={job}"), "StartTime=now"])
                .output();
            released = true;
        }
    });
    let log = cluster.log(&job);
    assert_eq!(state, "COMPLETED", "{log}");
    assert!(field(&cluster.job(&job), "Restarts").is_some_and(|r| r == "1"), "{log}");
    assert!(log.contains("requeueing job"), "{log}");
    let stopped = log
        .lines()
        .find_map(|l| l.strip_prefix("interrupted at step "))
        .and_then(|l| l.split(';').next())
        .unwrap_or_else(|| panic!("no checkpointed stop:\n{log}"))
        .to_string();
    assert_eq!(log.matches(&format!("interrupted at step {stopped};")).count(), 2, "{log}");
    assert!(log.contains(&format!("at step {stopped}")), "no resume at step {stopped}:\n{log}");
    assert_eq!(summary(&run)["steps"], 3 * 2048 / 16);
}

//! The SLURM deployment under `deploy/`: shell syntax, `#SBATCH` directives, shellcheck (when
//! installed), the signal-forwarding and requeue logic of the batch scripts run against a fake
//! trainer and a stub `scontrol`, the sweep's task table, the GPU benchmark driver against a
//! fake `nvidia-smi`, and the paper-setting configs through `mlaan-pipe plan`.
//!
//! Fast: no training, no GPU, no SLURM; the slowest part is `plan` on three configs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.sh` and `.sbatch` file under `deploy/`, sorted.
fn scripts() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("sh" | "sbatch")) {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&root().join("deploy"), &mut v);
    v.sort();
    assert!(v.len() >= 5, "expected the deploy scripts, found {v:?}");
    v
}

fn sbatch_files() -> Vec<PathBuf> {
    scripts().into_iter().filter(|p| p.extension().is_some_and(|x| x == "sbatch")).collect()
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

#[test]
fn scripts_parse_with_bash_n() {
    for s in scripts() {
        let o = Command::new("bash").arg("-n").arg(&s).output().unwrap();
        assert!(o.status.success(), "bash -n {}: {}", rel(&s), String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn scripts_pass_shellcheck_when_installed() {
    let present = Command::new("shellcheck")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!(
            "note: shellcheck is not installed, skipping (Debian: apt-get install shellcheck)"
        );
        return;
    }
    // -x follows `source` (the scripts name common.sh with a source-path directive).
    let o = Command::new("shellcheck")
        .arg("-x")
        .args(scripts().iter().map(|p| rel(p)))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "shellcheck -x:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The `#SBATCH` directives of a file as (option, value) pairs; also checks that they all come
/// before the first command, since sbatch stops reading them there.
fn directives(path: &Path) -> Vec<(String, Option<String>)> {
    let text = fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut in_header = true;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#SBATCH") {
            assert!(
                in_header,
                "{}:{}: #SBATCH after the first command is ignored",
                rel(path),
                n + 1
            );
            let rest = rest.trim();
            let (opt, val) = match rest.split_once('=') {
                Some((o, v)) => (o.to_string(), Some(v.to_string())),
                None => (rest.to_string(), None),
            };
            out.push((opt, val));
        } else if !t.is_empty() && !t.starts_with('#') {
            in_header = false;
        }
    }
    out
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `--time`: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
fn valid_time(v: &str) -> bool {
    let (days, rest) = match v.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, v),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    days.is_none_or(all_digits)
        && parts.iter().all(|p| all_digits(p))
        && (1..=3).contains(&parts.len())
        && parts.iter().skip(1).all(|p| p.len() == 2)
}

/// `--array`: comma-separated N or N-M[:step], optionally %limit.
fn valid_array(v: &str) -> bool {
    let (list, limit) = match v.split_once('%') {
        Some((l, n)) => (l, Some(n)),
        None => (v, None),
    };
    limit.is_none_or(all_digits)
        && list.split(',').all(|item| {
            let (range, step) = match item.split_once(':') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            step.is_none_or(all_digits)
                && match range.split_once('-') {
                    Some((a, b)) => {
                        all_digits(a)
                            && all_digits(b)
                            && a.parse::<u64>().unwrap() <= b.parse::<u64>().unwrap()
                    }
                    None => all_digits(range),
                }
        })
}

/// Whether `--opt[=val]` is one of the forms these scripts may use.
fn known_directive(opt: &str, val: Option<&str>) -> Result<(), String> {
    let name_ok = |v: &str| {
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let ok = match (opt, val) {
        ("--job-name" | "--partition" | "--account" | "--qos", Some(v)) => name_ok(v),
        ("--nodes" | "--ntasks" | "--ntasks-per-node" | "--cpus-per-task", Some(v)) => {
            all_digits(v) && v != "0"
        }
        ("--gres", Some(v)) => v.strip_prefix("gpu:").is_some_and(|n| all_digits(n) && n != "0"),
        ("--mem", Some(v)) => {
            let digits = v.trim_end_matches(['K', 'M', 'G', 'T']);
            all_digits(digits) && v.len() - digits.len() <= 1
        }
        ("--time", Some(v)) => valid_time(v),
        // Only the form the trainer's checkpoint logic is written for: USR1 to the batch
        // shell, ten minutes before the limit.
        ("--signal", Some(v)) => v == "B:USR1@600",
        ("--requeue" | "--exclusive", None) => true,
        ("--open-mode", Some(v)) => v == "append" || v == "truncate",
        ("--output" | "--error", Some(v)) => !v.is_empty() && !v.contains(char::is_whitespace),
        ("--array", Some(v)) => valid_array(v),
        _ => {
            return Err(format!(
                "unknown #SBATCH form {opt}{}",
                val.map(|v| format!("={v}")).unwrap_or_default()
            ))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad value in #SBATCH {opt}={}", val.unwrap_or("")))
    }
}

#[test]
fn sbatch_directives_are_known_and_complete() {
    let files = sbatch_files();
    let names: Vec<String> =
        files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["single_node.sbatch", "multi_node.sbatch", "sweep_array.sbatch", "bench.sbatch"] {
        assert!(names.iter().any(|n| n == want), "deploy/slurm/{want} is missing: {names:?}");
    }
    for f in &files {
        let d = directives(f);
        let mut seen = BTreeMap::new();
        for (opt, val) in &d {
            if let Err(e) = known_directive(opt, val.as_deref()) {
                panic!("{}: {e}", rel(f));
            }
            assert!(seen.insert(opt.clone(), val.clone()).is_none(), "{}: {opt} twice", rel(f));
        }
        let get = |o: &str| seen.get(o).cloned();
        for o in ["--job-name", "--nodes", "--gres", "--time", "--output"] {
            assert!(get(o).is_some(), "{}: no #SBATCH {o}", rel(f));
        }
        assert!(
            get("--ntasks").is_some() || get("--ntasks-per-node").is_some(),
            "{}: neither #SBATCH --ntasks nor --ntasks-per-node",
            rel(f)
        );
        let output = get("--output").flatten().unwrap();
        let array = get("--array").is_some();
        let pattern = if array { "%x-%A_%a" } else { "%x-%j" };
        assert!(output.contains(pattern), "{}: --output={output} lacks {pattern}", rel(f));
        // Training scripts must survive time limits and pre-emption.
        let text = fs::read_to_string(f).unwrap();
        if text.contains("mlaan_train_job") {
            assert_eq!(get("--signal"), Some(Some("B:USR1@600".into())), "{}", rel(f));
            assert_eq!(get("--requeue"), Some(None), "{}: no --requeue", rel(f));
            assert_eq!(get("--open-mode"), Some(Some("append".into())), "{}", rel(f));
        }
    }
}

/// Debian's `slurm-client` parses and checks the `#SBATCH` lines on the client (unknown options,
/// `--time`, `--signal`, `--open-mode`, numbers) before it contacts a controller; with a dummy
/// config pointing at no controller, "Unable to contact slurm controller" means they passed.
/// `--test-only` never submits anything, even if a controller answered.
#[test]
fn sbatch_accepts_the_directives_when_installed() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("slurm.conf");
    fs::write(
        &conf,
        "ClusterName=syntaxcheck\nSlurmctldHost=localhost\nSlurmctldPort=1\n\
         AuthType=auth/none\nCredType=cred/none\nGresTypes=gpu\nMessageTimeout=2\n",
    )
    .unwrap();
    // Even --version needs a config to read.
    let present = Command::new("sbatch")
        .arg("--version")
        .env("SLURM_CONF", &conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!("note: sbatch is not installed, skipping (Debian: apt-get install slurm-client)");
        return;
    }
    for f in sbatch_files() {
        let mut c = Command::new("sbatch");
        c.arg("--test-only").arg(&f).current_dir(dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("SLURM_") || k.starts_with("SBATCH_") {
                c.env_remove(k);
            }
        }
        let o = c.env("SLURM_CONF", &conf).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(
            text.contains("Unable to contact slurm controller")
                && !text.contains("error:")
                && !text.contains("unrecognized"),
            "sbatch --test-only {}:\n{text}",
            rel(&f)
        );
    }
}

#[test]
fn directive_checker_rejects_bad_forms() {
    assert!(known_directive("--signal", Some("USR1@600")).is_err());
    assert!(known_directive("--gres", Some("gpu:0")).is_err());
    assert!(known_directive("--time", Some("1:2:3:4")).is_err());
    assert!(known_directive("--array", Some("9-0")).is_err());
    assert!(known_directive("--mem", Some("64GB")).is_err());
    assert!(known_directive("-N", Some("1")).is_err());
    assert!(known_directive("--time", Some("1-00:00:00")).is_ok());
    assert!(known_directive("--array", Some("0-9,12%2")).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Behaviour: the batch scripts against a fake trainer and a stub scontrol.

const FAKE_TRAINER: &str = r#"#!/bin/bash
# A stand-in for `mlaan-pipe train`: records its arguments; USR1/TERM make it "drain" for a
# moment and exit 75, like the real one after writing its checkpoint.
log=${FAKE_LOG:?}
printf '%s\n' "$@" > "$log.args"
stop=0
if [[ -z ${FAKE_NO_TRAP:-} ]]; then
    trap 'echo USR1 >> "$log.signals"; stop=1' USR1
    trap 'echo TERM >> "$log.signals"; stop=1' TERM
fi
echo started > "$log.started"
for ((i = 0; i < ${FAKE_TICKS:-300}; i++)); do
    if ((stop)); then
        sleep "${FAKE_DRAIN:-0.3}"
        exit 75
    fi
    sleep 0.05
done
exit "${FAKE_RC:-0}"
"#;

const STUB_SCONTROL: &str = r#"#!/bin/bash
printf '%s\n' "$*" >> "${SCONTROL_LOG:?}"
if [[ $1 == show ]]; then
    echo "JobId=${3:-} JobName=fake UserId=me(1) JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None"
fi
if [[ $1 == requeue ]]; then
    exit "${FAKE_REQUEUE_RC:-0}"
fi
"#;

/// A nvidia-smi that lists FAKE_GPUS GPUs.
const FAKE_NVIDIA_SMI: &str = r#"#!/bin/bash
n=${FAKE_GPUS:-4}
if [[ ${1:-} == -L ]]; then
    for ((i = 0; i < n; i++)); do echo "GPU $i: Fake GPU (UUID: GPU-fake-$i)"; done
else
    echo "fake nvidia-smi $*"
fi
"#;

/// A mlaan-pipe for gpu_bench.sh: records each call, writes bench.md into --out.
const FAKE_BENCH: &str = r#"#!/bin/bash
if [[ ${1:-} == --version ]]; then echo "mlaan-pipe 0.0.0-fake"; exit 0; fi
echo "$*" >> "${FAKE_LOG:?}.calls"
out=""
while (($#)); do
    if [[ $1 == --out ]]; then out=$2; fi
    shift
done
mkdir -p "$out"
echo "| case | images/s |" > "$out/bench.md"
exit "${FAKE_RC:-0}"
"#;

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let s = Sandbox { dir: tempfile::tempdir().unwrap() };
        fs::create_dir_all(s.path("bin")).unwrap();
        s.script("bin/fake-trainer", FAKE_TRAINER);
        s.script("bin/scontrol", STUB_SCONTROL);
        s.script("bin/nvidia-smi", FAKE_NVIDIA_SMI);
        s.script("bin/fake-bench", FAKE_BENCH);
        s
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn script(&self, name: &str, text: &str) {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        let ok = Command::new("chmod").arg("+x").arg(&p).status().unwrap().success();
        assert!(ok, "chmod {}", p.display());
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// `bash SCRIPT ARGS` from the repository with SLURM faked: the submit directory is the
    /// sandbox, the stubs are first on PATH, and nothing of the caller's SLURM or CUDA
    /// environment leaks in.
    fn command(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new("bash");
        c.arg(root().join(script)).args(args).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("SLURM_") {
                c.env_remove(k);
            }
        }
        for k in [
            "CUDA_VISIBLE_DEVICES",
            "CONFIG",
            "RUN_DIR",
            "GPUS",
            "DEVICES",
            "EXTRA_ARGS",
            "DATA_DIR",
            "REQUEUE",
            "MAX_REQUEUES",
            "MLAAN_PIPE",
            "MLAAN_DEPLOY_DIR",
            "MLAAN_SCONTROL",
            "SWEEP_FILE",
            "CONFIGS",
            "SEEDS",
            "SWEEP_DIR",
            "BENCH_OUT",
        ] {
            c.env_remove(k);
        }
        let path = format!("{}:{}", self.path("bin").display(), std::env::var("PATH").unwrap());
        c.env("PATH", path)
            .env("SLURM_SUBMIT_DIR", self.dir.path())
            .env("FAKE_LOG", self.path("trainer"))
            .env("SCONTROL_LOG", self.path("scontrol.log"))
            .env("MLAAN_PIPE", self.path("bin/fake-trainer"))
            .env("CONFIG", root().join("configs/cifar10-resnet32-mlaan-dgl.toml"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(Stdio::null()).stderr(fs::File::create(self.path("stderr.log")).unwrap());
        c
    }

    fn stderr(&self) -> String {
        self.read("stderr.log")
    }

    /// Wait until `cond` holds (polling), or panic after `secs`.
    fn wait_for(&self, what: &str, secs: u64, cond: impl Fn(&Sandbox) -> bool) {
        let t = Instant::now();
        while !cond(self) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn trainer_args(&self) -> Vec<String> {
        self.read("trainer.args").lines().map(String::from).collect()
    }

    fn scontrol_calls(&self) -> Vec<String> {
        self.read("scontrol.log").lines().map(String::from).collect()
    }
}

/// Wait for the batch shell with a deadline; kills it on timeout.
fn finish(child: &mut Child, sb: &Sandbox, secs: u64) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("batch script did not finish in {secs} s; stderr:\n{}", sb.stderr());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("bash")
        .args(["-c", &format!("kill -s {sig} {}", child.id())])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -s {sig}");
}

/// Start single_node.sbatch with the fake trainer and wait until it runs with traps in place.
fn start_single(sb: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut base: Vec<(&str, &str)> =
        vec![("SLURM_JOB_ID", "4242"), ("SLURM_JOB_NAME", "deploy-test")];
    base.extend_from_slice(env);
    let child = sb.command("deploy/slurm/single_node.sbatch", args, &base).spawn().unwrap();
    sb.wait_for("the fake trainer to start", 20, |s| {
        s.path("trainer.started").exists() && s.stderr().contains("trainer started")
    });
    child
}

/// `single_node.sbatch` run to the end with `env`.
fn run_single(sb: &Sandbox, env: &[(&str, &str)]) -> ExitStatus {
    sb.command("deploy/slurm/single_node.sbatch", &[], env).status().unwrap()
}

fn code(s: ExitStatus) -> i32 {
    s.code().unwrap_or_else(|| panic!("killed by a signal: {s:?}"))
}

#[test]
fn usr1_is_forwarded_and_the_job_requeued() {
    let sb = Sandbox::new();
    let mut child = start_single(
        &sb,
        &["--epochs", "7"],
        &[("CUDA_VISIBLE_DEVICES", "3,5"), ("SLURM_GPUS_ON_NODE", "2")],
    );
    signal(&child, "USR1");
    let status = finish(&mut child, &sb, 20);
    let err = sb.stderr();
    assert_eq!(code(status), 0, "a requeued job ends its attempt with 0; stderr:\n{err}");
    assert_eq!(sb.read("trainer.signals").trim(), "USR1", "the trainer got USR1\n{err}");
    let run_dir = sb.path("runs/deploy-test-4242");
    let config = root().join("configs/cifar10-resnet32-mlaan-dgl.toml");
    let want: Vec<String> = [
        "train",
        "--config",
        config.to_str().unwrap(),
        "--resume",
        "auto",
        "--out",
        run_dir.to_str().unwrap(),
        "--gpus",
        "0,1",
        "--epochs",
        "7",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(sb.trainer_args(), want);
    assert!(run_dir.is_dir());
    let calls = sb.scontrol_calls();
    assert_eq!(calls.iter().filter(|c| *c == "requeue 4242").count(), 1, "{calls:?}\n{err}");
    assert!(err.contains("requeueing job 4242"), "{err}");
}

#[test]
fn a_second_signal_while_draining_is_forwarded_and_waited_out() {
    let sb = Sandbox::new();
    let mut child = start_single(&sb, &[], &[("DEVICES", "cpu,cpu"), ("FAKE_DRAIN", "1.0")]);
    signal(&child, "USR1");
    sb.wait_for("the first signal to arrive", 10, |s| s.read("trainer.signals").contains("USR1"));
    signal(&child, "TERM");
    let status = finish(&mut child, &sb, 20);
    let err = sb.stderr();
    assert_eq!(code(status), 0, "{err}");
    let got: Vec<String> = sb.read("trainer.signals").lines().map(String::from).collect();
    assert_eq!(got, ["USR1", "TERM"], "{err}");
    assert!(err.contains("trainer exited with code 75"), "{err}");
    assert!(sb.trainer_args().windows(2).any(|w| w == ["--devices", "cpu,cpu"]));
    assert_eq!(sb.scontrol_calls().iter().filter(|c| c.starts_with("requeue")).count(), 1);
}

#[test]
fn a_normal_finish_or_a_failure_is_not_requeued() {
    let sb = Sandbox::new();
    let status = run_single(
        &sb,
        &[("SLURM_JOB_ID", "7"), ("GPUS", "0,0,0,0"), ("FAKE_TICKS", "2"), ("RUN_DIR", "r")],
    );
    assert_eq!(code(status), 0, "{}", sb.stderr());
    assert!(sb.scontrol_calls().is_empty(), "{:?}", sb.scontrol_calls());
    assert!(sb.trainer_args().windows(2).any(|w| w == ["--gpus", "0,0,0,0"]));
    let out = sb.path("r");
    assert!(sb.trainer_args().windows(2).any(|w| w[0] == "--out" && Path::new(&w[1]) == out));

    let sb = Sandbox::new();
    let status = run_single(
        &sb,
        &[("SLURM_JOB_ID", "7"), ("DEVICES", "cpu"), ("FAKE_TICKS", "2"), ("FAKE_RC", "3")],
    );
    assert_eq!(code(status), 3, "the trainer's code is the job's: {}", sb.stderr());
    assert!(sb.scontrol_calls().is_empty());
}

#[test]
fn cancelled_jobs_and_opt_outs_are_not_requeued() {
    // scancel: the job is CANCELLED when TERM arrives.
    let sb = Sandbox::new();
    let mut child = start_single(&sb, &[], &[("DEVICES", "cpu"), ("FAKE_JOB_STATE", "CANCELLED")]);
    signal(&child, "TERM");
    assert_eq!(code(finish(&mut child, &sb, 20)), 75, "{}", sb.stderr());
    assert_eq!(sb.read("trainer.signals").trim(), "TERM");
    assert!(!sb.scontrol_calls().iter().any(|c| c.starts_with("requeue")));
    assert!(sb.stderr().contains("was cancelled"));

    // RUN_DIR/NO_REQUEUE: stop at a checkpoint on purpose.
    let sb = Sandbox::new();
    fs::create_dir_all(sb.path("keep")).unwrap();
    fs::write(sb.path("keep/NO_REQUEUE"), "").unwrap();
    let mut child = start_single(&sb, &[], &[("DEVICES", "cpu"), ("RUN_DIR", "keep")]);
    signal(&child, "USR1");
    assert_eq!(code(finish(&mut child, &sb, 20)), 75, "{}", sb.stderr());
    assert!(!sb.scontrol_calls().iter().any(|c| c.starts_with("requeue")));

    // Not a SLURM job at all: the code tells the caller to run again.
    let sb = Sandbox::new();
    let mut child =
        sb.command("deploy/slurm/single_node.sbatch", &[], &[("DEVICES", "cpu")]).spawn().unwrap();
    sb.wait_for("the fake trainer", 20, |s| {
        s.path("trainer.started").exists() && s.stderr().contains("trainer started")
    });
    signal(&child, "TERM");
    assert_eq!(code(finish(&mut child, &sb, 20)), 75, "{}", sb.stderr());
    assert!(sb.scontrol_calls().is_empty());
}

#[test]
fn a_trainer_killed_by_the_forwarded_signal_still_requeues() {
    // The signal can beat the trainer's own handlers at start-up; its last checkpoint stands.
    let sb = Sandbox::new();
    let mut child = start_single(&sb, &[], &[("DEVICES", "cpu"), ("FAKE_NO_TRAP", "1")]);
    signal(&child, "USR1");
    assert_eq!(code(finish(&mut child, &sb, 20)), 0, "{}", sb.stderr());
    assert_eq!(sb.scontrol_calls().iter().filter(|c| *c == "requeue 4242").count(), 1);
}

#[test]
fn missing_binary_or_gpus_fail_with_a_hint() {
    let sb = Sandbox::new();
    let config = root().join("configs/cifar10-resnet32-mlaan-dgl.toml");
    let cfg = config.to_str().unwrap();
    let st = run_single(
        &sb,
        &[("CONFIG", cfg), ("MLAAN_PIPE", "no/such/mlaan-pipe"), ("DEVICES", "cpu")],
    );
    assert_eq!(code(st), 2);
    assert!(sb.stderr().contains("make build"), "{}", sb.stderr());
    let st = run_single(
        &sb,
        &[("CONFIG", cfg), ("CUDA_VISIBLE_DEVICES", ""), ("SLURM_GPUS_ON_NODE", "4")],
    );
    assert_eq!(code(st), 2);
    assert!(sb.stderr().contains("no GPU visible"), "{}", sb.stderr());
}

/// The task rows of `sweep_array.sbatch --list`.
fn task_lines(list: &str) -> Vec<&str> {
    list.lines().filter(|l| l.split_whitespace().next().is_some_and(all_digits)).collect()
}

#[test]
fn sweep_tasks_map_to_config_and_seed() {
    let sb = Sandbox::new();
    fs::write(sb.path("a.toml"), "").unwrap();
    fs::write(sb.path("b.toml"), "").unwrap();
    fs::write(
        sb.path("sweep.txt"),
        "# comment\n\na.toml\n  b.toml --set optim.lr=0.4   # trailing comment\n",
    )
    .unwrap();
    let env = [("SWEEP_FILE", "sweep.txt"), ("SEEDS", "0 1 2"), ("DEVICES", "cpu")];

    let mut st = sb.command("deploy/slurm/sweep_array.sbatch", &["--list"], &env);
    let o: Output = st.stdout(Stdio::piped()).output().unwrap();
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", sb.stderr());
    assert!(list.contains("--array=0-5"), "{list}");
    assert_eq!(task_lines(&list).len(), 6, "{list}");
    assert!(
        list.contains("   4     1  b.toml --set optim.lr=0.4 -> runs/mlaan-sweep-local/1-b-seed1")
    );

    // Task 4 = line 1 (b.toml, its flags), seed index 1.
    let mut env4 = env.to_vec();
    env4.extend([
        ("SLURM_ARRAY_TASK_ID", "4"),
        ("SLURM_ARRAY_JOB_ID", "77"),
        ("SLURM_JOB_ID", "81"),
        ("FAKE_TICKS", "2"),
    ]);
    let st = sb.command("deploy/slurm/sweep_array.sbatch", &["--epochs", "1"], &env4).status();
    assert_eq!(code(st.unwrap()), 0, "{}", sb.stderr());
    let args = sb.trainer_args();
    let run_dir = sb.path("runs/mlaan-sweep-77/1-b-seed1");
    let has = |a: &str, b: &str| args.windows(2).any(|w| w[0] == a && w[1] == b);
    assert!(has("--config", sb.path("b.toml").to_str().unwrap()), "{args:?}");
    assert!(has("--out", run_dir.to_str().unwrap()), "{args:?}");
    assert!(has("--seed", "1") && has("--set", "optim.lr=0.4") && has("--epochs", "1"), "{args:?}");
    assert!(has("--resume", "auto"), "{args:?}");

    // Past the end of the sweep: an error that names the size.
    let mut env6 = env.to_vec();
    env6.push(("SLURM_ARRAY_TASK_ID", "6"));
    let st = sb.command("deploy/slurm/sweep_array.sbatch", &[], &env6).status().unwrap();
    assert_eq!(code(st), 2);
    assert!(sb.stderr().contains("past the sweep's 6 tasks"), "{}", sb.stderr());

    // The default sweep file lists existing configs, and the default array covers it exactly.
    let o = sb
        .command("deploy/slurm/sweep_array.sbatch", &["--list"], &[])
        .env("SLURM_SUBMIT_DIR", root())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", sb.stderr());
    let sbatch_array = directives(&root().join("deploy/slurm/sweep_array.sbatch"))
        .into_iter()
        .find(|(o, _)| o == "--array")
        .and_then(|(_, v)| v)
        .unwrap();
    assert!(list.contains(&format!("--array={sbatch_array} ")), "{sbatch_array} vs\n{list}");
    for line in task_lines(&list) {
        let config = line.split_whitespace().nth(2).unwrap();
        assert!(root().join(config).is_file(), "{config} in sweep.txt does not exist");
    }
}

#[test]
fn sweep_task_requeues_its_own_job_id() {
    let sb = Sandbox::new();
    let config = root().join("configs/cifar10-resnet110-mlaan-infopro.toml");
    let env = [
        ("CONFIGS", config.to_str().unwrap()),
        ("SEEDS", "3"),
        ("DEVICES", "cpu"),
        ("SLURM_ARRAY_TASK_ID", "0"),
        ("SLURM_ARRAY_JOB_ID", "500"),
        ("SLURM_JOB_ID", "501"),
    ];
    let mut child = sb.command("deploy/slurm/sweep_array.sbatch", &[], &env).spawn().unwrap();
    sb.wait_for("the fake trainer", 20, |s| {
        s.path("trainer.started").exists() && s.stderr().contains("trainer started")
    });
    signal(&child, "USR1");
    assert_eq!(code(finish(&mut child, &sb, 20)), 0, "{}", sb.stderr());
    assert_eq!(sb.scontrol_calls().iter().filter(|c| *c == "requeue 501").count(), 1);
    let run_dir = sb.path("runs/mlaan-sweep-500/0-cifar10-resnet110-mlaan-infopro-seed3");
    assert!(run_dir.is_dir(), "{}", sb.stderr());
}

// ---------------------------------------------------------------------------------------------
// gpu_bench.sh and bench.sbatch against a fake nvidia-smi and a fake mlaan-pipe.

fn bench_calls(sb: &Sandbox) -> Vec<String> {
    sb.read("trainer.calls").lines().map(String::from).collect()
}

#[test]
fn gpu_bench_runs_the_compute_set_then_the_standard_set() {
    let sb = Sandbox::new();
    let bin = sb.path("bin/fake-bench");
    let st = sb
        .command(
            "deploy/gpu_bench.sh",
            &["--out", "res", "--full", "--imagenet", "--quick", "--bin", bin.to_str().unwrap()],
            &[("FAKE_GPUS", "8")],
        )
        .status()
        .unwrap();
    assert_eq!(code(st), 0, "{}", sb.stderr());
    let calls = bench_calls(&sb);
    assert_eq!(calls.len(), 9, "{calls:?}");
    // The compute set: every stage on GPU 0; fp32 and bf16, one stream and one per stage.
    let compute = calls.iter().find(|c| c.contains("--arch resnet32") && c.contains("+bf16"));
    let compute = compute.unwrap_or_else(|| panic!("no compute set in {calls:?}"));
    assert!(compute.starts_with("bench --gpus 0,0,0,0 ") && compute.contains("--batch-size 1024"));
    for case in
        ["e2e+fp32", "e2e+bf16", "dgl+bf16+stream-per-stage", "mlaan-dgl:sync+fp32+default-stream"]
    {
        assert!(compute.contains(case), "{case}: {compute}");
    }
    let r34 = calls.iter().find(|c| c.contains("--cases e2e+bf16,mlaan-dgl+bf16"));
    assert!(
        r34.is_some_and(|c| c.contains("--arch resnet34") && c.contains("size=224")),
        "{calls:?}"
    );
    // ViT-S/16 at 224 beside them, contiguous (channels-last does not apply to a ViT).
    let vit = calls.iter().find(|c| c.contains("--cases e2e+bf16,dgl+bf16,mlaan-dgl+bf16"));
    assert!(
        vit.is_some_and(|c| c.starts_with("bench --gpus 0,0,0,0 --arch vit-small --k 4 ")
            && c.contains("size=224")
            && !c.contains("channels-last")),
        "{calls:?}"
    );
    let calls: Vec<String> = calls.into_iter().filter(|c| !c.contains("+bf16")).collect();
    assert_eq!(calls.len(), 6, "{calls:?}");
    for (arch, gpus) in [
        ("resnet32", "0,0,0,0"),
        ("resnet32", "0,1,2,3"),
        ("resnet110", "0,0,0,0"),
        ("resnet110", "0,1,2,3"),
        ("resnet34", "0,0,0,0"),
        ("resnet34", "0,1,2,3"),
    ] {
        let want = format!("--gpus {gpus} --arch {arch} --k 4 ");
        assert!(
            calls.iter().any(|c| c.starts_with("bench ") && c.contains(&want)),
            "{want}: {calls:?}"
        );
    }
    assert!(calls.iter().all(|c| c.contains("--steps 5 --warmup 2 --repeats 1")), "{calls:?}");
    let imagenet = |c: &&String| c.contains("resnet34");
    assert!(calls.iter().filter(imagenet).all(|c| {
        c.contains("--batch-size 128")
            && c.contains("data.synthetic_size=224")
            && c.contains("--cases e2e,gpipe,dgl,infopro,mlaan-dgl,mlaan-dgl:sync ")
    }));
    assert!(calls.iter().filter(|c| !imagenet(c)).all(|c| !c.contains("--cases")), "{calls:?}");
    let res = sb.path("res");
    assert!(res.join("system/nvidia-smi-L.txt").is_file() && res.join("system/host.txt").is_file());
    assert!(sb.read("res/system/nvidia-smi-L.txt").contains("GPU 7"));
    let readme = sb.read("res/README.md");
    assert_eq!(readme.matches("| case | images/s |").count(), 9, "{readme}");
    assert_eq!(sb.read("res/status.tsv").lines().count(), 10);

    // One GPU: only the single-GPU layouts; a failing benchmark fails the script.
    let sb = Sandbox::new();
    let bin = sb.path("bin/fake-bench");
    let st = sb
        .command(
            "deploy/gpu_bench.sh",
            &["--out", "res", "--bin", bin.to_str().unwrap()],
            &[("FAKE_GPUS", "1"), ("FAKE_RC", "1")],
        )
        .status()
        .unwrap();
    assert_eq!(code(st), 1, "{}", sb.stderr());
    let calls = bench_calls(&sb);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.iter().all(|c| c.contains("--gpus 0,0,0,0")), "{calls:?}");
}

#[test]
fn bench_sbatch_wraps_gpu_bench() {
    let sb = Sandbox::new();
    let st = sb
        .command(
            "deploy/slurm/bench.sbatch",
            &["--quick"],
            &[
                ("SLURM_JOB_ID", "9"),
                ("SLURM_JOB_NAME", "mlaan-bench"),
                ("CUDA_VISIBLE_DEVICES", "2,6"),
                ("MLAAN_PIPE", sb.path("bin/fake-bench").to_str().unwrap()),
            ],
        )
        .status()
        .unwrap();
    assert_eq!(code(st), 0, "{}", sb.stderr());
    let calls = bench_calls(&sb);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.iter().all(|c| c.contains("--gpus 0,0,0,0")), "{calls:?}");
    assert!(sb.path("runs/mlaan-bench-9/README.md").is_file());
}

/// The real CLI accepts what gpu_bench.sh passes: the config part through `plan` (repeated GPU
/// indices included), the benchmark flags by name in `bench --help`.
#[test]
fn gpu_bench_arguments_are_accepted_by_the_cli() {
    let sb = Sandbox::new();
    let o = sb
        .command("deploy/gpu_bench.sh", &["--dry-run", "--gpus", "4", "--full", "--imagenet"], &[])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", sb.stderr());
    let lines = String::from_utf8_lossy(&o.stdout).into_owned();
    let help = Command::new(env!("CARGO_BIN_EXE_mlaan-pipe")).args(["bench", "--help"]).output();
    let help = String::from_utf8_lossy(&help.unwrap().stdout).into_owned();
    let bench_only = ["--steps", "--warmup", "--repeats", "--cases", "--out"];
    let mut checked = 0;
    for line in lines.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.get(1), Some(&"bench"), "{line}");
        let mut plan_args =
            vec!["plan", "--set", "pipeline.placement=\"flops\"", "--method", "dgl"];
        let mut i = 2;
        while i < words.len() {
            let (flag, value) = (words[i], words.get(i + 1).copied().unwrap_or(""));
            assert!(help.contains(flag), "bench --help has no {flag}");
            if !bench_only.contains(&flag) {
                plan_args.extend([flag, value]);
            }
            i += 2;
        }
        if !plan_args.contains(&"--dataset") {
            // What `bench` assumes without a dataset: CIFAR-shaped synthetic data.
            plan_args.extend(["--dataset", "synthetic"]);
        }
        let o = Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"))
            .args(&plan_args)
            .env("MLAAN_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mlaan-pipe {}: {}",
            plan_args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
        checked += 1;
    }
    assert_eq!(checked, 9, "{lines}");
}

// ---------------------------------------------------------------------------------------------
// The paper-setting configs.

const CONFIGS: [(&str, &str, usize, &[&str]); 5] = [
    ("cifar10-resnet32-mlaan-dgl.toml", "resnet32", 15, &[]),
    ("cifar10-resnet110-mlaan-infopro.toml", "resnet110", 54, &[]),
    ("svhn-resnet32-mlaan-dgl.toml", "resnet32", 15, &[]),
    ("stl10-resnet32-mlaan-dgl.toml", "resnet32", 15, &["--set", "data.synthetic_size=96"]),
    ("imagenet-resnet34-mlaan.toml", "resnet34", 16, &["--set", "data.synthetic_size=224"]),
];

#[test]
fn paper_configs_have_the_paper_settings() {
    use mlaan_core::config::{Method, RunConfig, Schedule};
    for (file, arch, k, _) in CONFIGS {
        let c = RunConfig::load(Some(&root().join("configs").join(file)), &[]).unwrap();
        assert_eq!((c.model.arch.as_str(), c.model.k), (arch, k), "{file}");
        assert!(c.method.name.is_mlaan(), "{file}");
        assert_eq!((c.optim.momentum, c.optim.weight_decay), (0.9, 1e-4), "{file}");
        assert!(c.optim.nesterov, "{file}");
        assert_eq!(c.pipeline.schedule, Schedule::Async, "{file}");
        assert_eq!(c.method.ema_momentum, 0.995, "{file}");
        assert!(
            c.pipeline.devices == [mlaan_core::device::DeviceSpec::Cpu],
            "{file}: devices come from --gpus, not the file"
        );
        let (samples, steps_per_epoch) = if file.starts_with("cifar10") || file.starts_with("svhn")
        {
            // SVHN trains like CIFAR-10 in the reference code.
            let (dataset, samples) =
                if file.starts_with("svhn") { ("svhn", 73_257) } else { ("cifar10", 50_000) };
            assert_eq!(c.data.dataset, dataset);
            assert_eq!(
                (c.train.batch_size, c.optim.lr, c.train.epochs),
                (1024, 0.8, 400),
                "{file}"
            );
            assert_eq!((c.optim.warmup_epochs, c.optim.warmup_start_lr), (10.0, 0.01), "{file}");
            (samples, samples / 1024)
        } else if file.starts_with("stl10") {
            assert_eq!(c.data.dataset, "stl10");
            assert_eq!((c.train.batch_size, c.optim.lr, c.train.epochs), (128, 0.1, 400), "{file}");
            (5_000, 5_000 / 128)
        } else {
            assert_eq!(c.data.dataset, "imagenet");
            assert_eq!(
                (c.train.batch_size, c.optim.lr, c.train.epochs),
                (128, 0.05, 150),
                "{file}"
            );
            assert_eq!(c.method.cascade_depth, 3, "{file}: the ImageNet code uses d=3");
            (1_281_167, 1_281_167 / 128)
        };
        if c.method.name == Method::MlaanInfopro {
            assert_eq!(c.method.cascade_depth, 3, "{file}: the InfoPro variant uses d=3");
        }
        if arch == "resnet32" || file.starts_with("cifar10") {
            assert_eq!(c.method.lam.source, "official", "{file}: the official code's LAM chains");
        }
        if arch == "resnet110" && c.method.name.uses_infopro_loss() {
            // InfoPro's and AugLocal's ResNet-110 λ, not the ResNet-32 ones.
            let lambdas = (c.method.lambda_first, c.method.lambda_last);
            assert_eq!(lambdas, ([5.0, 0.0], [0.5, 1.0]), "{file}");
        }
        // Checkpoints: at least a few per day-long run, not so many that writing them matters;
        // a step-count checkpoint that lands on an epoch end is skipped without at_epoch_end.
        let every = c.checkpoint.every_steps;
        let total = steps_per_epoch * c.train.epochs;
        assert!(every > 0 && every < total / 20, "{file}: every_steps {every} of {total}");
        assert!(
            c.checkpoint.at_epoch_end || !every.is_multiple_of(steps_per_epoch),
            "{file}: every_steps {every} is a multiple of the {steps_per_epoch} steps per epoch \
             ({samples} samples)"
        );
    }
}

/// `mlaan-pipe plan` of a shipped config on four GPUs (`--gpus 0,1,2,3`) with synthetic data
/// and `extra` flags; its output, after asserting it succeeded. `placement = flops` skips the
/// measured profile (minutes on a CPU for K=54); the split, chains and parameter counts are
/// the same.
fn plan_on_four_gpus(file: &str, extra: &[&str]) -> String {
    let path = root().join("configs").join(file);
    let o = Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"))
        .args(["plan", "--config", path.to_str().unwrap(), "--dataset", "synthetic"])
        .args(["--set", "pipeline.placement=\"flops\"", "--gpus", "0,1,2,3"])
        .args(extra)
        .env("MLAAN_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "plan {file}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn paper_configs_pass_plan() {
    for (file, arch, k, extra) in CONFIGS {
        let out = plan_on_four_gpus(file, extra);
        assert!(out.contains(&format!("{arch} K={k} ")), "{file}:\n{out}");
        assert!(out.contains("one module per block"), "{file}:\n{out}");
        assert!(out.contains("stage 3  cuda:3"), "{file}: four stages\n{out}");
    }
}

/// One of AugLocal's official runs as a shipped config.
struct AugLocalRun {
    file: &'static str,
    arch: &'static str,
    k: usize,
    depth: usize,
    pyramid: f64,
    batch: usize,
    lr: f64,
    epochs: usize,
    warmup: f64,
}

const AUGLOCAL_CONFIGS: [AugLocalRun; 3] = [
    AugLocalRun {
        file: "cifar10-resnet32-auglocal.toml",
        arch: "resnet32",
        k: 14,
        depth: 2,
        pyramid: 0.5,
        batch: 1024,
        lr: 0.8,
        epochs: 400,
        warmup: 10.0,
    },
    AugLocalRun {
        file: "cifar10-resnet110-auglocal.toml",
        arch: "resnet110",
        k: 52,
        depth: 3,
        pyramid: 0.5,
        batch: 1024,
        lr: 0.8,
        epochs: 400,
        warmup: 10.0,
    },
    AugLocalRun {
        file: "imagenet-resnet34-auglocal.toml",
        arch: "resnet34",
        k: 17,
        depth: 4,
        pyramid: 0.0,
        batch: 1024,
        lr: 0.4,
        epochs: 200,
        warmup: 0.0,
    },
];

#[test]
fn auglocal_configs_have_the_official_settings_and_plan() {
    use mlaan_core::config::{Method, RunConfig};
    for AugLocalRun { file, arch, k, depth, pyramid, batch, lr, epochs, warmup } in AUGLOCAL_CONFIGS
    {
        let path = root().join("configs").join(file);
        let c = RunConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(c.method.name, Method::Auglocal, "{file}");
        assert_eq!((c.model.arch.as_str(), c.model.k), (arch, k), "{file}");
        assert_eq!(
            (c.method.auglocal.depth, c.method.auglocal.pyramid),
            (depth, pyramid),
            "{file}"
        );
        assert_eq!((c.train.batch_size, c.optim.lr, c.train.epochs), (batch, lr, epochs), "{file}");
        assert_eq!(c.optim.warmup_epochs, warmup, "{file}");
        assert!(c.optim.nesterov && c.optim.momentum == 0.9 && c.optim.weight_decay == 1e-4);
        let size =
            if arch == "resnet34" { "data.synthetic_size=224" } else { "data.synthetic_size=32" };
        let out = plan_on_four_gpus(file, &["--set", size]);
        assert!(out.contains(&format!("auglocal {arch} K={k} ")), "{file}:\n{out}");
        assert!(out.contains("one module per layer, the stem its own"), "{file}:\n{out}");
        assert!(out.contains(&format!("CE(AugLocal net d={depth}: ")), "{file}:\n{out}");
        assert!(out.contains("stage 3  cuda:3"), "{file}: four stages\n{out}");
    }
}

/// The ViT and VGG configs: what they train, and a plan on four GPUs with one module each.
#[test]
fn backbone_configs_pass_plan() {
    use mlaan_core::config::RunConfig;
    for (file, arch, k, dataset) in [
        ("cifar10-vit-tiny-p4-mlaan-dgl.toml", "vit-tiny-p4", 4, "cifar10"),
        ("imagenet-vit-small-mlaan-dgl.toml", "vit-small", 4, "imagenet"),
        ("imagenet-vgg13-mlaan-dgl.toml", "vgg13", 4, "imagenet"),
    ] {
        let path = root().join("configs").join(file);
        let c = RunConfig::load(Some(&path), &[]).unwrap();
        assert_eq!((c.model.arch.as_str(), c.model.k, c.data.dataset.as_str()), (arch, k, dataset));
        assert!(c.method.name.is_mlaan(), "{file}");
        let size = if dataset == "imagenet" {
            "data.synthetic_size=224"
        } else {
            "data.synthetic_size=32"
        };
        let out = plan_on_four_gpus(file, &["--set", size]);
        assert!(out.contains(&format!("{arch} K={k} ")), "{file}:\n{out}");
        assert!(out.contains("stage 3  cuda:3"), "{file}: four stages\n{out}");
        assert!(out.contains("(equal)"), "{file}: parameters against the formula\n{out}");
    }
}

/// A packed mlaan-pipe for gpu_check.sh: one GPU in `doctor`, a finished run for `train`, a
/// bench.md for `bench`; every call recorded.
const FAKE_PACKED_BIN: &str = r#"#!/bin/bash
echo "$*" >> "${FAKE_LOG:?}.calls"
case $1 in
doctor)
    if [[ ${2:-} == --json ]]; then echo '{ "libtorch_cuda_devices": 1 }'; else echo "verdict        --gpus can use 1 GPU(s)"; fi ;;
train) echo "mlaan-dgl resnet8 K=3 on synthetic: test accuracy 0.9100 (1 epochs, 300 steps), 5000.0 images/s, 8.0 s" ;;
launch)
    out=""
    while (($#)); do [[ $1 == --out ]] && out=$2; shift; done
    if [[ -n $out ]]; then mkdir -p "$out"; echo '{ "reducers": ["nccl", "nccl", "nccl"] }' > "$out/summary.json"; fi
    echo "launched" ;;
bench)
    out=""
    while (($#)); do [[ $1 == --out ]] && out=$2; shift; done
    mkdir -p "$out"; echo "| case | images/s |" > "$out/bench.md" ;;
--version) echo "mlaan-pipe 0.0.0-fake" ;;
esac
"#;

/// A packed test binary: one test per filter, which passes, skips (no second GPU) or fails;
/// records the strict switch it saw.
const FAKE_TEST_BIN: &str = r#"#!/bin/bash
echo "$1 MLAAN_REQUIRE_CUDA=${MLAAN_REQUIRE_CUDA:-unset}" >> "${FAKE_LOG:?}.tests"
if [[ $1 == *across_two_gpus* ]]; then
    echo "test $1 ... skipped: needs 2 CUDA devices, 1 visible"; echo ok
    echo "test result: ok. 1 passed; 0 failed"
elif [[ -n ${FAKE_FAIL:-} && $1 == *"$FAKE_FAIL"* ]]; then
    echo "thread '$1' panicked at x.rs:1:1:"; echo "test result: FAILED. 0 passed; 1 failed"; exit 101
else
    echo "test $1 ... ok"; echo "test result: ok. 1 passed; 0 failed"
fi
"#;

/// The packed all-reduce benchmark: its ratio table.
const FAKE_ALLREDUCE: &str = r#"#!/bin/bash
printf '| buffer | NCCL / Gloo through host (time) |\n|--:|--:|\n| 65536 KiB | 0.031 |\n'
"#;

/// A pack as `gpu_check.sh --pack` makes it, with fakes for the binaries, and a torch dir.
fn fake_pack(sb: &Sandbox) -> (PathBuf, PathBuf) {
    let pack = sb.path("pack");
    fs::create_dir_all(pack.join("tests")).unwrap();
    fs::create_dir_all(pack.join("configs")).unwrap();
    sb.script("pack/mlaan-pipe", FAKE_PACKED_BIN);
    sb.script("pack/tests/mlaan-train--compute", FAKE_TEST_BIN);
    sb.script("pack/allreduce-bench", FAKE_ALLREDUCE);
    fs::write(pack.join("tests.txt"), "mlaan-train--compute\n").unwrap();
    fs::write(pack.join("manifest.txt"), "torch_series=2.11\n").unwrap();
    fs::copy(root().join("deploy/gpu_bench.sh"), pack.join("gpu_bench.sh")).unwrap();
    fs::copy(root().join("configs/default.toml"), pack.join("configs/default.toml")).unwrap();
    let torch = sb.path("torch");
    fs::create_dir_all(torch.join("lib")).unwrap();
    fs::write(torch.join("version.py"), "__version__ = '2.11.0+cu130'\n").unwrap();
    (pack, torch)
}

#[test]
fn gpu_check_runs_every_row_strictly_and_prints_one_table() {
    let sb = Sandbox::new();
    let (pack, torch) = fake_pack(&sb);
    let args = ["--pack-dir", pack.to_str().unwrap(), "--torch", torch.to_str().unwrap()];
    let run = |extra: &[(&str, &str)]| {
        let mut a = args.to_vec();
        a.extend(["--out", "check"]);
        code(sb.command("deploy/gpu_check.sh", &a, extra).status().unwrap())
    };
    assert_eq!(run(&[("FAKE_GPUS", "1")]), 0, "{}", sb.stderr());
    let table = sb.read("check/gpu_check.md");
    let rows: Vec<&str> =
        table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| check")).collect();
    assert!(rows.len() >= 8, "{table}");
    for (check, result) in [
        ("doctor", "PASS"),
        ("sync = sequential, 2 and 4 stages on one GPU", "PASS"),
        ("sync = sequential, --gpus 0,1", "SKIP"),
        ("every other CUDA test", "PASS"),
        ("train --gpus 0,0 fp32", "PASS"),
        ("train --gpus 0,0 bf16", "PASS"),
        ("gloo replicas, 2 processes on --gpus 0,0", "PASS"),
        ("NCCL all-reduce = Gloo", "PASS"),
        ("nccl, 1 replica, --gpus 0", "PASS"),
        ("all-reduce bandwidth, NCCL and Gloo through host", "PASS"),
        ("NCCL across two GPUs", "SKIP"),
        ("gpu_bench compute set", "PASS"),
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(&format!("| {check}")) && r.contains(&format!("| {result}"))),
            "{check}: {result}\n{table}"
        );
    }
    assert!(table.contains("5000.0 images/s") && table.contains("0.031×"), "{table}");
    // Every CUDA test ran with the strict switch.
    let tests = sb.read("trainer.tests");
    assert!(
        tests.lines().count() >= 3 && tests.lines().all(|l| l.ends_with("MLAAN_REQUIRE_CUDA=1")),
        "{tests}"
    );
    let calls = sb.read("trainer.calls");
    assert!(calls.contains("train --config") && calls.contains("--gpus 0,0"), "{calls}");
    assert!(calls.contains("train.precision=\"bf16\""), "{calls}");
    assert!(calls.lines().any(|c| c.starts_with("launch --nproc-per-node 2 -- train")), "{calls}");
    assert!(calls.contains("distributed.backend=\"nccl\""), "{calls}");

    // A failing test fails the check, naming it; the other rows still run.
    let sb = Sandbox::new();
    let (pack, torch) = fake_pack(&sb);
    let a =
        ["--pack-dir", pack.to_str().unwrap(), "--torch", torch.to_str().unwrap(), "--out", "c"];
    let st = sb.command("deploy/gpu_check.sh", &a, &[("FAKE_FAIL", "stages_sharing")]).status();
    assert_eq!(code(st.unwrap()), 1, "{}", sb.stderr());
    let table = sb.read("c/gpu_check.md");
    assert!(table.contains("| sync = sequential, 2 and 4 stages on one GPU | FAIL"), "{table}");
    assert!(table.contains("| gpu_bench compute set | PASS"), "{table}");

    // Another torch than the pack's is refused before anything runs.
    fs::write(torch.join("version.py"), "__version__ = '2.10.1'\n").unwrap();
    let st = sb.command("deploy/gpu_check.sh", &a, &[]).status().unwrap();
    assert_eq!(code(st), 2);
    assert!(sb.stderr().contains("2.10"), "{}", sb.stderr());
}

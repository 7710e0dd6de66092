//! Long runs that survive a cluster: a resumed run continues exactly as if nothing had
//! happened; a process killed while writing a checkpoint leaves the previous one usable;
//! SIGTERM drains, checkpoints and exits with the documented code within seconds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// Exit code of a run stopped by a signal after its checkpoint (EX_TEMPFAIL).
const EXIT_INTERRUPTED: i32 = 75;

/// A tiny run: ResNet-8 on 16x16 synthetic images, 6 batches per epoch, 3 epochs unless
/// `extra` says otherwise. Placed by FLOPs: a measured placement can differ between the runs
/// compared, and async MLAAN's losses depend on which modules share a stage.
fn args(method: &str, schedule: &str, devices: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let epochs = if extra.contains(&"--epochs") { None } else { Some(["--epochs", "3"]) };
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
        schedule,
        "--devices",
        devices,
        "--batch-size",
        "16",
        "--set",
        "data.synthetic_samples=96",
        "--set",
        "data.synthetic_size=16",
        "--set",
        "pipeline.intra_op_threads=1",
        "--set",
        "train.log_every=1",
        "--set",
        "data.workers=1",
        "--set",
        "pipeline.placement=flops",
    ]
    .iter()
    .chain(epochs.iter().flatten())
    .map(|s| s.to_string())
    .collect();
    v.extend(["--out".into(), out.display().to_string()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn command(a: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"));
    c.args(a).env("MLAAN_LOG", "info").env_remove("MLAAN_DATA_DIR");
    c
}

fn run_ok(a: &[String]) -> String {
    let o = command(a).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{a:?} failed:\n{err}");
    err
}

/// Every tensor of a checkpoint directory, by file and name.
fn tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut v = Vec::new();
    for f in files {
        let mut t = Tensor::read_safetensors(&f).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        v.extend(t.into_iter().map(|(n, t)| (format!("{}:{n}", f.display()), t)));
    }
    v
}

fn assert_bitwise_equal(a: &Path, b: &Path) {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(x.len() > 20);
    for ((n1, t1), (n2, t2)) in x.iter().zip(&y) {
        assert_eq!(n1.rsplit(':').next(), n2.rsplit(':').next());
        assert!(t1.equal(t2), "`{n1}` differs between {} and {}", a.display(), b.display());
    }
}

/// Training loss of the last stage by step, from metrics.jsonl.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap_or(f64::NAN)))
        .collect()
}

#[test]
fn resumed_runs_continue_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mixed = ["--set", "train.precision=bf16", "--set", "train.memory_format=channels-last"];
    let half = ["--set", "train.precision=fp16"];
    for (method, schedule, devices, compute) in [
        ("mlaan-dgl", "sequential", "cpu", &[][..]),
        ("mlaan-dgl", "sync", "cpu,cpu", &[]),
        ("dgl", "async", "cpu,cpu", &[]),
        ("mlaan-dgl", "async", "cpu,cpu", &[]),
        ("mlaan-auglocal", "sync", "cpu,cpu", &[]),
        // Mixed precision resumes as exactly: the masters, momentum and twins are float32.
        ("mlaan-infopro", "sync", "cpu,cpu", &mixed[..]),
        // fp16 too: each module's loss scale is in the checkpoint.
        ("mlaan-dgl", "sync", "cpu,cpu", &half[..]),
    ] {
        let precision = compute.get(1).and_then(|c| c.split_once('=')).map(|(_, p)| p);
        let name = format!("{method}-{schedule}-{}", precision.unwrap_or("fp32"));
        let straight = tmp.path().join(format!("{name}-straight"));
        let halves = tmp.path().join(format!("{name}-halves"));
        let with = |extra: &[&'static str]| [extra, compute].concat();
        // The half-way point is an epoch end, where the straight run drains too.
        run_ok(&args(method, schedule, devices, &straight, &with(&["--max-steps", "12"])));
        run_ok(&args(method, schedule, devices, &halves, &with(&["--max-steps", "6"])));
        let async_mlaan = method == "mlaan-dgl" && schedule == "async";
        // Async applies late gradients when they come, so two runs differ before any resume;
        // what a checkpoint determines is the first step after it: resume one twice.
        let again = tmp.path().join(format!("{name}-again"));
        if async_mlaan {
            copy_dir(&halves, &again);
            run_ok(&args(
                method,
                schedule,
                devices,
                &again,
                &with(&["--max-steps", "12", "--resume", "auto"]),
            ));
        }
        let log = run_ok(&args(
            method,
            schedule,
            devices,
            &halves,
            &with(&["--max-steps", "12", "--resume", "auto"]),
        ));
        assert!(log.contains("resuming from") && log.contains("step-00000006"), "{log}");
        // Throughput counts the 6 steps this process trained, not the 12 since step 0.
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(halves.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(
            (summary["steps"].as_u64(), summary["steps_this_run"].as_u64()),
            (Some(12), Some(6))
        );
        let images =
            summary["train_images_per_s"].as_f64().unwrap() * summary["train_s"].as_f64().unwrap();
        assert!((images - 6.0 * 16.0).abs() < 1e-6 * 96.0, "{images} images in {summary}");
        let (a, b) = (losses(&straight), losses(&halves));
        assert_eq!(a.iter().filter(|(s, _)| *s > 6).count(), 6);
        if async_mlaan {
            let first = |v: &[(u64, f64)]| v.iter().find(|(s, _)| *s == 7).map(|x| x.1);
            let c = losses(&again);
            assert_eq!(first(&b), first(&c), "{method} {schedule}: loss right after resuming");
            assert!(first(&b).is_some());
            continue;
        }
        assert_eq!(a, b, "{name}: loss trajectories differ");
        let ckpt = straight.join("ckpt/step-00000012");
        assert_bitwise_equal(&ckpt, &halves.join("ckpt/step-00000012"));
        for (n, t) in tensors(&ckpt) {
            // Floating state is float32 whatever the compute dtype (counters are integers, the
            // fp16 loss scale's record float64).
            let integer = matches!(t.kind(), tch::Kind::Int64 | tch::Kind::Int);
            let scale = n.ends_with(".loss_scale") && t.kind() == tch::Kind::Double;
            assert!(
                integer || scale || t.kind() == tch::Kind::Float,
                "{name}: `{n}` is {:?}",
                t.kind()
            );
        }
    }
}

/// A copy of the run directory `from` (checkpoints included) at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A ViT resumes exactly too (width 32, four blocks, 4x4 patches on the same 16x16 images,
/// K = 3): MLAAN on InfoPro (token heads, the per-patch decoder, LAM copies of blocks and their
/// EMA twins) under `sync` in bf16, and MLAAN on DGL under `sequential`.
#[test]
fn resumed_vit_runs_continue_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let vit = |a: Vec<String>| -> Vec<String> {
        a.into_iter().map(|w| if w == "resnet8" { "vit-w32-d4-h2-p4".into() } else { w }).collect()
    };
    for (method, schedule, devices, compute) in [
        ("mlaan-infopro", "sync", "cpu,cpu", &["--set", "train.precision=bf16"][..]),
        ("mlaan-dgl", "sequential", "cpu", &[]),
    ] {
        let straight = tmp.path().join(format!("{method}-straight"));
        let halves = tmp.path().join(format!("{method}-halves"));
        let with = |extra: &[&'static str]| [extra, compute].concat();
        run_ok(&vit(args(method, schedule, devices, &straight, &with(&["--max-steps", "12"]))));
        run_ok(&vit(args(method, schedule, devices, &halves, &with(&["--max-steps", "6"]))));
        let resume = with(&["--max-steps", "12", "--resume", "auto"]);
        let log = run_ok(&vit(args(method, schedule, devices, &halves, &resume)));
        assert!(log.contains("resuming from") && log.contains("vit-w32-d4-h2-p4"), "{log}");
        let (a, b) = (losses(&straight), losses(&halves));
        assert_eq!(a.iter().filter(|(s, _)| *s > 6).count(), 6, "{method}");
        assert_eq!(a, b, "{method} {schedule}: loss trajectories differ");
        assert_bitwise_equal(
            &straight.join("ckpt/step-00000012"),
            &halves.join("ckpt/step-00000012"),
        );
    }
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ready() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &Child, signal: &str) {
    let ok = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

#[test]
fn killed_while_writing_a_checkpoint_resumes_from_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let a = args(
        "mlaan-dgl",
        "async",
        "cpu,cpu",
        &run,
        &[
            "--set",
            "checkpoint.every_steps=2",
            "--checkpoint-pause-ms",
            "4000",
            "--max-steps",
            "12",
        ],
    );
    let mut child = command(&a).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let ckpt = run.join("ckpt");
    // The first checkpoint pauses 4 s before its marker; kill the writer of the second.
    wait_for("the first checkpoint", Duration::from_secs(60), || {
        ckpt.join("step-00000002/COMPLETE").exists()
    });
    wait_for("the second checkpoint to be half written", Duration::from_secs(60), || {
        ckpt.join(".tmp-step-00000004/meta.json").exists()
    });
    kill(&child, "-KILL");
    child.wait().unwrap();
    assert!(!ckpt.join("step-00000004").exists());
    let log = run_ok(&args(
        "mlaan-dgl",
        "async",
        "cpu,cpu",
        &run,
        &["--max-steps", "6", "--resume", "auto"],
    ));
    assert!(log.contains("step-00000002"), "resume must use the previous checkpoint:\n{log}");
    assert!(log.contains(".tmp-step-00000004"), "the half-written one is named:\n{log}");
    assert!(ckpt.join("step-00000006/COMPLETE").exists());
}

#[test]
fn sigterm_drains_checkpoints_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let a = args("mlaan-dgl", "async", "cpu,cpu", &run, &["--epochs", "500"]);
    let mut child = command(&a).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("training to start", Duration::from_secs(60), || {
        std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|s| s.lines().count() >= 3)
    });
    let t = Instant::now();
    kill(&child, "-TERM");
    let status = child.wait().unwrap();
    let took = t.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(EXIT_INTERRUPTED), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // The checkpoint of the step where it stopped is complete (an epoch-end checkpoint may
    // precede it when the machine is slow to deliver the signal).
    let step: u64 = err
        .split("interrupted at step ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `interrupted at step N` in:\n{err}"));
    let dir = run.join("ckpt").join(format!("step-{step:08}"));
    assert!(dir.join("COMPLETE").exists(), "{} is not complete:\n{err}", dir.display());
    let half_written = std::fs::read_dir(run.join("ckpt"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .count();
    assert_eq!(half_written, 0, "no half-written checkpoint is left behind");
}

fn eval_accuracy(extra: &[&str]) -> f64 {
    let mut a = vec!["eval", "--json"];
    a.extend(extra);
    let o = command(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "eval {extra:?}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["test_accuracy"].as_f64().unwrap()
}

#[test]
fn export_writes_the_backbone_that_eval_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    run_ok(&args("mlaan-dgl", "sequential", "cpu", &run, &["--max-steps", "6"]));
    let ckpt = run.join("ckpt/step-00000006");
    assert!(ckpt.join("COMPLETE").is_file(), "no final checkpoint in {}", run.display());
    let (from_run, from_ckpt) =
        (tmp.path().join("a.safetensors"), tmp.path().join("b.safetensors"));
    for (source, out) in [(&run, &from_run), (&ckpt, &from_ckpt)] {
        let o = command(&[
            "export".into(),
            source.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ])
        .output()
        .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("wrote") && stdout.contains("CIFAR ResNet"), "{stdout}");
    }
    let sorted = |p: &Path| {
        let mut v = Tensor::read_safetensors(p).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (a, b) = (sorted(&from_run), sorted(&from_ckpt));
    // The final model and the final checkpoint hold the same backbone, and nothing else.
    assert_eq!(a.len(), b.len());
    for ((n1, t1), (n2, t2)) in a.iter().zip(&b) {
        assert_eq!(n1, n2);
        assert!(t1.equal(t2), "`{n1}` differs between the model and the checkpoint");
        assert!(!n1.starts_with("aux.") && !n1.starts_with("ema."), "`{n1}` exported");
    }
    let bns = a.iter().filter(|(n, _)| n.ends_with(".running_var")).count();
    let counters: Vec<i64> = a
        .iter()
        .filter(|(n, _)| n.ends_with(".num_batches_tracked"))
        .map(|(_, t)| t.int64_value(&[]))
        .collect();
    assert!(bns > 5 && counters.len() == bns, "{bns} batch norms, {} counters", counters.len());
    assert!(counters.iter().all(|&c| c == 6), "{counters:?}");
    // eval reads the export and scores it exactly as the run's own model.
    let config = run.join("config.toml");
    let own = eval_accuracy(&["--model", run.to_str().unwrap()]);
    let exported = eval_accuracy(&[
        "--model",
        from_run.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(own, exported);
    // A directory without weights is an error that says what it looked for.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = command(&["export".into(), empty.display().to_string(), "--out".into(), "x".into()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("model.safetensors"), "{err}");
}

//! What a new user meets first: `mlaan-pipe [TRAIN FLAGS]` is `train`, `--dataset` picks that
//! dataset's recipe (the shipped config, compiled in), `doctor` says why there is no GPU, and
//! set-up's GPU branch installs what torch's own metadata pins.

use mlaan_core::config::RunConfig;
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mlaan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"))
        .args(args)
        .env("MLAAN_LOG", "info")
        .env_remove("MLAAN_DATA_DIR")
        .env("NO_COLOR", "1")
        .output()
        .expect("the binary starts")
}

fn ok(args: &[&str]) -> (String, String) {
    let o = mlaan(args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{args:?} failed\nstdout:\n{out}\nstderr:\n{err}");
    (out, err)
}

fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["plan", "--json"];
    a.extend(args);
    let (out, _) = ok(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{a:?}: {e}\n{out}"))
}

/// The shipped config a dataset's recipe is, read as a user's `--config` would be.
fn recipe_file(file: &str) -> RunConfig {
    RunConfig::load(Some(&root().join("configs").join(file)), &[]).unwrap()
}

#[test]
fn the_headline_command_plans_the_paper_imagenet_setting_on_four_gpus() {
    // No --config, no data on this machine, no GPU: what `mlaan-pipe --gpus 0,1,2,3 --dataset
    // imagenet` would train.
    let p = plan_json(&["--gpus", "0,1,2,3", "--dataset", "imagenet"]);
    let want = recipe_file("imagenet-resnet34-mlaan.toml");
    assert_eq!(p["method"], "mlaan-dgl");
    assert_eq!(p["arch"], "resnet34");
    assert_eq!(p["k"].as_u64(), Some(want.model.k as u64));
    assert_eq!(p["num_classes"].as_u64(), Some(1000));
    assert_eq!(p["batch_size"].as_u64(), Some(128));
    assert!(p["config_source"].as_str().unwrap().contains("configs/imagenet-resnet34-mlaan.toml"));
    assert!(p["data_note"].as_str().unwrap().contains("definition"), "{}", p["data_note"]);
    let stages = p["placement"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 4);
    let devices: Vec<&str> = stages.iter().map(|s| s["device"].as_str().unwrap()).collect();
    assert_eq!(devices, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]);
    // Every module placed once, in order.
    let ends: Vec<[u64; 2]> = stages
        .iter()
        .map(|s| [s["modules"][0].as_u64().unwrap(), s["modules"][1].as_u64().unwrap()])
        .collect();
    assert_eq!(ends[0][0], 0);
    assert_eq!(ends[3][1], want.model.k as u64);
    assert!(ends.windows(2).all(|w| w[0][1] == w[1][0]), "{ends:?}");
}

#[test]
fn every_dataset_takes_its_recipe_and_flags_go_on_top() {
    for (dataset, file) in [
        ("fashion-mnist", "default.toml"),
        ("mnist", "default.toml"),
        ("cifar10", "cifar10-resnet32-mlaan-dgl.toml"),
        ("cifar100", "cifar10-resnet32-mlaan-dgl.toml"),
        ("svhn", "svhn-resnet32-mlaan-dgl.toml"),
        ("stl10", "stl10-resnet32-mlaan-dgl.toml"),
        ("imagenet", "imagenet-resnet34-mlaan.toml"),
    ] {
        let want = recipe_file(file);
        let p = plan_json(&["--dataset", dataset, "--set", "pipeline.placement=flops"]);
        let source = p["config_source"].as_str().unwrap();
        assert!(source.starts_with("recipe ") && source.contains(file), "{dataset}: {source}");
        assert_eq!(p["dataset"], dataset);
        assert_eq!(p["arch"], want.model.arch.as_str(), "{dataset}");
        assert_eq!(p["k"].as_u64(), Some(want.model.k as u64), "{dataset}");
        assert_eq!(p["method"], want.method.name.name(), "{dataset}");
        assert_eq!(p["batch_size"].as_u64(), Some(want.train.batch_size as u64), "{dataset}");
        assert_eq!(p["schedule"], want.pipeline.schedule.to_string(), "{dataset}");
    }
    // A flag on top of the recipe; the dataset's definition fixes its classes.
    let p = plan_json(&["--dataset", "cifar100", "--k", "4", "--method", "dgl"]);
    assert_eq!((p["k"].as_u64(), p["method"].as_str()), (Some(4), Some("dgl")));
    assert_eq!(p["num_classes"].as_u64(), Some(100));
    // No dataset at all: the default dataset's recipe, `make run`'s setting.
    let p = plan_json(&[]);
    assert!(p["config_source"].as_str().unwrap().contains("configs/default.toml"), "{p}");
    // --config replaces the recipe; a dataset without a recipe starts from the defaults.
    let p = plan_json(&["--config", "configs/debug.toml", "--dataset", "imagenet"]);
    assert_eq!(p["config_source"], "config file configs/debug.toml");
    assert_eq!(p["arch"], "resnet8");
    let p = plan_json(&["--dataset", "synthetic"]);
    assert_eq!(p["config_source"], "built-in defaults");
}

#[test]
fn the_bare_command_trains_and_names_its_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // `mlaan-pipe --dataset synthetic ...` with no subcommand: the same run as `train`.
    let (_, err) = ok(&[
        "--dataset",
        "synthetic",
        "--arch",
        "resnet8",
        "--method",
        "dgl",
        "--k",
        "2",
        "--devices",
        "cpu",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--set",
        "data.synthetic_size=16",
        "--set",
        "data.synthetic_samples=64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(out.join("summary.json").is_file(), "{err}");
    assert!(err.contains("synthetic from built-in defaults"), "{err}");
    // Nothing at all: the help, which says what the bare command does.
    let o = mlaan(&[]);
    let help =
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(help.contains("mlaan-pipe [TRAIN FLAGS]") && help.contains("recipe"), "{help}");
    // A subcommand's flags and a bare command's do not mix.
    let o = mlaan(&["--k", "2", "plan"]);
    assert!(!o.status.success());
}

#[test]
fn a_missing_gpu_fails_before_the_run_has_a_directory_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = mlaan(&["--gpus", "0", "--dataset", "synthetic", "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    if mlaan_train::devices::cuda_device_count() > 0 {
        return;
    }
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("GPU 0") && err.contains("--devices cpu"), "{err}");
    if let mlaan_train::devices::CudaBackend::NotLoaded(msg) =
        mlaan_train::devices::load_cuda_backend()
    {
        assert!(err.contains(msg.as_str()), "the loader's reason is in the error: {err}");
    }
    assert!(!out.exists(), "a failed start leaves no run directory");
}

#[test]
fn doctor_says_why_there_is_no_gpu() {
    let (text, _) = ok(&["doctor"]);
    for line in [
        "libtorch ",
        "CUDA backend",
        "driver",
        "NVML GPUs",
        "CUDA GPUs",
        "NCCL",
        "Gloo",
        "cores",
        "data",
        "verdict",
    ] {
        assert!(text.contains(line), "no `{line}` line:\n{text}");
    }
    let (json, _) = ok(&["doctor", "--json", "--dataset", "cifar10", "--data-dir", "/nonexistent"]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(r["libtorch_version"].as_str().unwrap().starts_with("2.11"), "{r}");
    assert_eq!(r["data"]["found"], false);
    assert!(r["data"]["detail"].as_str().unwrap().contains("/nonexistent"), "{r}");
    if r["libtorch_cuda_devices"].as_u64() == Some(0) {
        let verdict = r["verdict"].as_str().unwrap();
        assert!(verdict.starts_with("no GPU for --gpus: "), "{verdict}");
        if let Some(e) = r["cuda_backend_error"].as_str() {
            // The loader's own message, naming the library that is missing.
            assert!(e.contains(".so") && verdict.contains(e), "{r}");
        }
    }
}

/// Requirement lines of torch's installed metadata, read here without pip's machinery: every
/// CUDA library torch pins for Linux.
fn torch_cuda_requirements() -> Vec<String> {
    let venv = root().join(".venv/lib");
    let site = std::fs::read_dir(&venv)
        .unwrap()
        .map(|e| e.unwrap().path().join("site-packages"))
        .find(|p| p.join("torch").is_dir())
        .expect("make test installs torch into .venv");
    let meta = std::fs::read_to_string(site.join("torch-2.11.0.dist-info/METADATA")).unwrap();
    meta.lines()
        .filter_map(|l| l.strip_prefix("Requires-Dist: "))
        .filter(|r| r.starts_with("nvidia-") || r.starts_with("cuda-toolkit"))
        .map(|r| {
            let (req, marker) = r.split_once(';').unwrap();
            assert_eq!(marker.trim(), "platform_system == \"Linux\"", "{r}");
            // `cuda-toolkit[b,a]==1` as pip writes it back: extras sorted.
            match req.split_once('[') {
                Some((name, rest)) => {
                    let (extras, version) = rest.split_once(']').unwrap();
                    let mut e: Vec<&str> = extras.split(',').collect();
                    e.sort();
                    format!("{name}[{}]{version}", e.join(","))
                }
                None => req.to_string(),
            }
        })
        .collect()
}

fn cuda_plan(env: &[(&str, &str)]) -> (String, String) {
    let mut c = Command::new(root().join("scripts/setup.sh"));
    c.arg("--cuda-plan").env_remove("LIBTORCH").env_remove("CUDA").env_remove("MLAAN_GPU_PROBE");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{out}\n{err}");
    (out, err)
}

#[test]
fn setup_installs_what_torch_pins_when_a_driver_is_present() {
    let want = torch_cuda_requirements();
    assert!(want.iter().any(|r| r.starts_with("nvidia-nccl-cu13==")), "{want:?}");
    // A stand-in driver probe that finds one: the list is torch's own.
    let (out, err) = cuda_plan(&[("MLAAN_GPU_PROBE", "true")]);
    assert!(err.contains("an NVIDIA driver is present"), "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    // One that finds none: nothing; CUDA=1 installs anyway, CUDA=0 never.
    let (out, err) = cuda_plan(&[("MLAAN_GPU_PROBE", "false")]);
    assert!(out.is_empty() && err.contains("installs nothing"), "{out}{err}");
    let (out, _) = cuda_plan(&[("MLAAN_GPU_PROBE", "false"), ("CUDA", "1")]);
    assert_eq!(out.lines().count(), want.len());
    let (out, _) = cuda_plan(&[("MLAAN_GPU_PROBE", "true"), ("CUDA", "0")]);
    assert!(out.is_empty());
    let o = Command::new(root().join("scripts/setup.sh"))
        .arg("--cuda-plan")
        .env("CUDA", "maybe")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("CUDA=maybe"));
}

//! The binary end to end: `plan`, `train` + `eval`, `data`, and clean errors (non-zero exit, a
//! message naming the culprit, never a panic).

use std::path::Path;
use std::process::{Command, Output};

fn mlaan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"))
        .args(args)
        .env("MLAAN_LOG", "warn")
        .env_remove("MLAAN_DATA_DIR")
        .output()
        .expect("the binary starts")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = mlaan(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?} failed\nstdout:\n{out}\nstderr:\n{err}");
    out
}

/// Runs and expects a clean failure (exit 1, no panic); returns stderr.
fn fails(args: &[&str]) -> String {
    let o = mlaan(args);
    let (out, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?} should fail cleanly\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    err
}

fn json(path: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}\n{s}", path.display()))
}

const PLAN_R32_K4: &[&str] = &[
    "plan",
    "--dataset",
    "synthetic",
    "--arch",
    "resnet32",
    "--method",
    "mlaan-dgl",
    "--k",
    "4",
    "--devices",
    "cpu,cpu",
];

#[test]
fn plan_shows_split_chains_and_placement() {
    let out = ok(PLAN_R32_K4);
    for want in [
        "resnet32",
        "3x32x32",
        "K=4 from InfoPro table",
        "[1,2] [2,1] [3,0]",
        "MLAAN table (resnet32)",
        "stem [1,0]..[1,2]",
        "cascade",
        // Step 1 ends in stage 2, step 2 at [3,0] (docs/method.md §4).
        "[3,0] [3,2] [3,3] [3,4] (twin of [3,0] from module 2)",
        "[3,1] [3,2] [3,4] (twin of [3,1] from module 3)",
        "trained by cascade of module 1",
        "(equal)",
        "stage 1",
        "intra-op threads",
    ] {
        assert!(out.contains(want), "missing `{want}` in\n{out}");
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plan.json");
    let mut args = PLAN_R32_K4.to_vec();
    args.extend(["--json", file.to_str().unwrap()]);
    ok(&args);
    let p = json(&file);
    assert_eq!(p["k"], 4);
    assert_eq!(p["split_ends"], serde_json::json!([[1, 2], [2, 1], [3, 0]]));
    assert_eq!(p["total"]["backbone"], p["arch_params"]);
    let m = &p["modules"];
    assert_eq!(m[0]["terms"].as_array().unwrap().len(), 0);
    assert_eq!(m[1]["terms"][1]["kind"], "cascade");
    assert_eq!(m[1]["terms"][1]["reaches"], serde_json::json!([0, 1]));
    assert_eq!(m[2]["terms"][1]["ema_source_module"], 3);
    assert!(m[1]["params"]["lam"].as_u64().unwrap() > 0);
    assert!(m[1]["params"]["ema"].as_u64().unwrap() > 0);
    assert_eq!(m[0]["activation_bytes"], 16 * 32 * 32 * 128 * 4);
    assert_eq!(p["placement"]["stages"].as_array().unwrap().len(), 2);
    assert_eq!(m[1]["terms"][1]["ema_follows"], true);

    // The official CIFAR code's twins: only the last step's follows its block.
    let mut args = PLAN_R32_K4.to_vec();
    args.extend(["--set", "method.ema_update=last"]);
    let out = ok(&args);
    for want in [
        "EMA update last",
        "[3,0] [3,2] [3,3] [3,4] (twin of [3,0] frozen at initialisation)",
        "[3,1] [3,2] [3,4] (twin of [3,1] from module 3)",
    ] {
        assert!(out.contains(want), "missing `{want}` in\n{out}");
    }
}

/// The counted arithmetic: the MACs counted while running the backbone equal the architecture's
/// formula (written apart from the layers), an e2e step is 6 × its forward MACs in FLOPs
/// (forward, backward to activations, backward to weights), and MLAAN's terms add their LAM
/// chains on top.
#[test]
fn plan_counts_training_flops() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plan.json");
    let base = ["plan", "--dataset", "synthetic", "--arch", "resnet20", "--devices", "cpu"];
    let e2e = ["--method", "e2e", "--k", "1", "--schedule", "sequential", "--json"];
    ok(&[&base[..], &e2e[..], &[file.to_str().unwrap()]].concat());
    let m = &json(&file)["modules"][0];
    let formula = m["macs_per_sample"].as_f64().unwrap();
    let counted = m["flops"]["backbone_macs"].as_f64().unwrap();
    assert!((counted - formula).abs() / formula < 0.01, "counted {counted}, formula {formula}");
    let train = m["flops"]["train_flops"].as_f64().unwrap();
    let expected = 6.0 * (counted + m["flops"]["term_macs"].as_f64().unwrap());
    assert!((train - expected).abs() / expected < 1e-9, "{train} vs {expected}");

    ok(&[&base[..], &["--method", "mlaan-dgl", "--k", "3", "--json", file.to_str().unwrap()]]
        .concat());
    // Module 0 has no loss of its own; module 1's cascade runs a LAM chain.
    let m = &json(&file)["modules"][1];
    let f = &m["flops"];
    assert!(f["term_macs"].as_f64().unwrap() > f["backbone_macs"].as_f64().unwrap(), "{f}");
    assert!(f["train_flops"].as_f64().unwrap() > 6.0 * f["backbone_macs"].as_f64().unwrap());
}

/// `bench` with nothing but devices and cases: synthetic CIFAR-shaped data, ResNet-32, K = 4.
#[test]
fn bench_runs_with_its_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let args = ["bench", "--devices", "cpu,cpu", "--cases", "e2e,dgl:sync", "--batch-size", "8"];
    let timing = ["--warmup", "0", "--steps", "1", "--repeats", "1", "--out"];
    let o = ok(&[&args[..], &timing[..], &[out.to_str().unwrap()]].concat());
    assert!(o.contains("resnet32") && o.contains("K = 4"), "{o}");
    assert!(out.join("bench.json").is_file());
}

/// `plan --nproc-per-node` shows each local rank's slice of `--gpus` and places one replica
/// on its slice; a list that does not split is an error naming the numbers.
#[test]
fn plan_shows_each_local_rank_its_gpu_slice() {
    let base = ["plan", "--dataset", "synthetic", "--arch", "resnet20", "--method", "dgl"];
    let out =
        ok(&[&base[..], &["--k", "2", "--gpus", "0,1,2,3", "--nproc-per-node", "2"]].concat());
    assert!(out.contains("local rank 0: cuda:0,cuda:1 · 1: cuda:2,cuda:3"), "{out}");
    assert!(out.contains("placement on cuda:0,cuda:1"), "{out}");
    let err =
        fails(&[&base[..], &["--k", "2", "--gpus", "0,1,2", "--nproc-per-node", "2"]].concat());
    assert!(
        err.contains("3 GPU(s) in pipeline.devices cannot be split evenly among the 2"),
        "{err}"
    );
}

/// `plan` says how the stages will compute, and marks the CUDA-only switches unused on CPU.
#[test]
fn plan_prints_the_compute_settings() {
    let base = ["plan", "--dataset", "synthetic", "--arch", "resnet20", "--method", "dgl"];
    let out = ok(&[&base[..], &["--k", "2", "--devices", "cpu"]].concat());
    assert!(
        out.contains("compute       fp32, contiguous; CUDA: a stream per stage, cuDNN benchmark on, TF32 on (no CUDA device: unused)"),
        "{out}"
    );
    let mixed = ["--set", "train.precision=bf16", "--set", "train.memory_format=channels-last"];
    let cuda = ["--set", "pipeline.streams=default", "--set", "train.tf32=false"];
    let out = ok(&[&base[..], &["--k", "2", "--gpus", "0"], &mixed[..], &cuda[..]].concat());
    assert!(
        out.contains("compute       bf16, channels-last; CUDA: the default stream, cuDNN benchmark on, TF32 off\n"),
        "{out}"
    );
    let err = fails(&[&base[..], &["--k", "2", "--set", "train.precision=tf32"]].concat());
    assert!(err.contains("`tf32`") && err.contains("`bf16`"), "{err}");
}

#[test]
fn plan_errors_name_the_numbers() {
    let err = fails(&[
        "plan",
        "--dataset",
        "synthetic",
        "--method",
        "dgl",
        "--k",
        "3",
        "--set",
        "model.split=[[2,1],[1,3]]",
    ]);
    assert!(err.contains("[1,3]") && err.contains("[2,1]"), "{err}");
    let err = fails(&["plan", "--dataset", "synthetic", "--method", "dgl", "--k", "99"]);
    assert!(err.contains("K=99"), "{err}");
    let err = fails(&["plan", "--dataset", "synthetic", "--set", "optim.lrr=0.1"]);
    assert!(err.contains("lrr"), "{err}");
    // A GPU that is not here: the plan is printed anyway, with a note.
    let out = ok(&["plan", "--dataset", "synthetic", "--method", "dgl", "--k", "2", "--gpus", "7"]);
    assert!(out.contains("GPU 7"), "{out}");
}

#[test]
fn config_errors_say_which_input_and_what_is_wrong() {
    // An unknown key from the command line: named as such, not as a TOML syntax error.
    let err = fails(&["train", "--dataset", "synthetic", "--set", "optim.lrr=0.1"]);
    assert!(err.contains("command-line setting `optim.lrr=0.1`"), "{err}");
    assert!(err.contains("unknown key `lrr`") && err.contains("`lr`"), "{err}");
    assert!(!err.contains("not valid TOML"), "{err}");
    // The same in a file: the file and the line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[optim]\nlr = 0.1\nlrr = 0.1\n").unwrap();
    let err = fails(&["train", "--config", file.to_str().unwrap()]);
    assert!(err.contains(&format!("config file {}, line 3", file.display())), "{err}");
    assert!(err.contains("unknown key `lrr`") && !err.contains("not valid TOML"), "{err}");
    // An impossible K without --method: the K is the problem, not e2e's schedule.
    let err = fails(&["train", "--dataset", "synthetic", "--arch", "resnet32", "--k", "99"]);
    assert!(err.contains("model.k") && err.contains("99"), "{err}");
    assert!(!err.contains("async"), "{err}");
}

#[test]
fn train_writes_a_run_that_eval_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let tiny = [
        "--dataset",
        "synthetic",
        "--arch",
        "resnet8",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--set",
        "data.synthetic_samples=128",
        "--set",
        "data.synthetic_size=16",
        "--set",
        "data.workers=1",
    ];
    let mut args = vec!["train", "-q", "--method", "dgl", "--k", "2", "--devices", "cpu,cpu"];
    args.extend(tiny);
    args.extend(["--out", run_s]);
    ok(&args);
    for f in ["config.toml", "metrics.jsonl", "summary.json", "model.safetensors"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() > 0);
    for line in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("bad metrics line {line}: {e}"));
    }
    let summary = json(&run.join("summary.json"));
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{summary}");
    assert_eq!(summary["module_accuracy"].as_array().unwrap().len(), 2);

    // The run directory alone is enough: its config and model.
    let out = ok(&["eval", "--model", run_s, "--json"]);
    let e: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("eval --json stdout: {e}\n{out}"));
    assert_eq!(e["test_accuracy"].as_f64().unwrap(), acc, "{e} vs {summary}");
    assert!(
        (e["test_loss"].as_f64().unwrap() - summary["test_loss"].as_f64().unwrap()).abs() < 1e-4
    );

    // The model file with the wrong architecture: the tensors are named.
    let model = run.join("model.safetensors");
    let err = fails(&["eval", "--model", model.to_str().unwrap(), "--arch", "resnet14"]);
    assert!(err.contains("missing") && err.contains("layer1.1."), "{err}");
    let err = fails(&["eval", "--model", dir.path().to_str().unwrap()]);
    assert!(err.contains("model.safetensors"), "{err}");

    // A GPU that is not here.
    let mut args = vec!["train", "-q", "--gpus", "7"];
    args.extend(tiny);
    let out = dir.path().join("gpu");
    args.extend(["--out", out.to_str().unwrap()]);
    let err = fails(&args);
    assert!(err.contains("GPU 7"), "{err}");
}

#[test]
fn data_imagefolder_is_made_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("folder");
    let f = folder.to_str().unwrap();
    ok(&[
        "data",
        "make-imagefolder",
        f,
        "--classes",
        "3",
        "--per-class",
        "4",
        "--width",
        "40",
        "--height",
        "30",
    ]);
    assert!(folder.join("train/class_002/img_00003.jpg").is_file());
    assert!(folder.join("val/class_000/img_00000.jpg").is_file());
    let out = ok(&["data", "verify", "--dataset", "imagefolder", "--data-dir", f]);
    assert!(out.contains("OK") && out.contains("samples: 12"), "{out}");
    let out = ok(&[
        "data",
        "bench",
        "--dataset",
        "imagefolder",
        "--data-dir",
        f,
        "--workers",
        "1",
        "--batch",
        "4",
        "--batches",
        "3",
    ]);
    assert!(out.contains("images/s"), "{out}");
    let err = fails(&["data", "fetch", "synthetic", "--to", f]);
    assert!(err.contains("synthetic"), "{err}");
}

/// CIFAR-10 binary files of `records` records each, labels 0..10.
fn write_cifar(dir: &Path, records: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut names: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    names.push("test_batch.bin".into());
    for (f, name) in names.iter().enumerate() {
        let mut bytes = Vec::new();
        for r in 0..records {
            bytes.push(((f + r) % 10) as u8);
            bytes.extend((0..3072).map(|p| ((p + r) % 251) as u8));
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn data_verify_names_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("cifar10");
    write_cifar(&d, 3);
    let ds = d.to_str().unwrap();
    let out = ok(&["data", "verify", "--dataset", "cifar10", "--data-dir", ds]);
    assert!(out.contains("OK"), "{out}");
    // Truncate one file mid-record.
    let bad = d.join("data_batch_3.bin");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    let err = fails(&["data", "verify", "--dataset", "cifar10", "--data-dir", ds]);
    assert!(err.contains("data_batch_3.bin"), "{err}");
}

/// A finished run as `compare` reads it: summary.json, and config.toml when `config` is given.
fn fake_run(dir: &Path, method: &str, k: usize, seed: u64, acc: f64, config: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    let summary = serde_json::json!({
        "method": method, "arch": "resnet32", "k": k, "seed": seed, "epochs": 1,
        "test_accuracy": acc, "module_accuracy": vec![serde_json::Value::Null; k],
        "train_images_per_s": 10.0,
    });
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    if let Some(c) = config {
        std::fs::write(dir.join("config.toml"), c).unwrap();
    }
}

#[test]
fn compare_tables_seeds_and_cascade_depth_variants() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fake_run(&d.join("e2e"), "e2e", 1, 0, 0.90, None);
    fake_run(&d.join("infopro-0"), "infopro", 8, 0, 0.84, None);
    fake_run(&d.join("infopro-1"), "infopro", 8, 1, 0.83, None);
    let depth = |n: usize| {
        format!("[model]\nk = 8\n[method]\nname = \"mlaan-infopro\"\ncascade_depth = {n}\n")
    };
    fake_run(&d.join("ml-0"), "mlaan-infopro", 8, 0, 0.87, Some(&depth(2)));
    fake_run(&d.join("ml-d3-0"), "mlaan-infopro", 8, 0, 0.88, Some(&depth(3)));
    let md = d.join("results.md");
    let runs: Vec<String> = ["e2e", "infopro-0", "infopro-1", "ml-0", "ml-d3-0"]
        .iter()
        .map(|r| d.join(r).to_str().unwrap().to_string())
        .collect();
    let mut args = vec!["compare", "-q", "--markdown", md.to_str().unwrap()];
    args.extend(runs.iter().map(String::as_str));
    ok(&args);
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(
        text.contains("| infopro | 8 | 1 | 84.00 (seed 0), 83.00 (seed 1) | **83.50** | 1.00 |"),
        "{text}"
    );
    assert!(text.contains("| mlaan-infopro | 8 |"), "{text}");
    assert!(text.contains("| mlaan-infopro (d=3) | 8 |"), "{text}");
    // (87 − 83.5) / (90 − 83.5) = 54%; (88 − 83.5) / 6.5 = 69%.
    assert!(
        text.contains("- mlaan-infopro vs infopro: +3.50") && text.contains("closes 54%"),
        "{text}"
    );
    assert!(
        text.contains("- mlaan-infopro (d=3) vs infopro: +4.50") && text.contains("closes 69%"),
        "{text}"
    );

    // A run without its summary is named.
    let missing = d.join("nothing");
    std::fs::create_dir_all(&missing).unwrap();
    let err = fails(&["compare", missing.to_str().unwrap()]);
    assert!(err.contains("summary.json"), "{err}");
}

#[test]
fn compare_writes_its_section_of_a_page_and_names_schedule_and_ema_variants() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = |extra: &str| format!("[model]\nk = 8\n[method]\nname = \"mlaan-dgl\"\n{extra}");
    fake_run(&d.join("seq"), "mlaan-dgl", 8, 0, 0.88, Some(&config("")));
    let asynchronous = config("[pipeline]\nschedule = \"async\"\ndevices = [\"cpu\", \"cpu\"]\n");
    fake_run(&d.join("async"), "mlaan-dgl", 8, 0, 0.87, Some(&asynchronous));
    fake_run(&d.join("last"), "mlaan-dgl", 8, 0, 0.86, Some(&config("ema_update = \"last\"\n")));
    let md = d.join("results.md");
    let page = "# Page\n\n<!-- methods -->\nthe methods table\n<!-- /methods -->\n";
    std::fs::write(&md, page).unwrap();
    let compare = |runs: &[&str]| {
        let mut args = vec!["compare", "-q", "--markdown", md.to_str().unwrap()];
        args.extend(["--section", "ablation", "--title", "Ablation"]);
        let dirs: Vec<String> = runs.iter().map(|r| d.join(r).to_str().unwrap().into()).collect();
        args.extend(dirs.iter().map(String::as_str));
        ok(&args);
        std::fs::read_to_string(&md).unwrap()
    };
    let text = compare(&["seq", "async", "last"]);
    assert!(text.starts_with(page.trim_end()), "{text}");
    assert!(text.contains("<!-- ablation -->\n## Ablation\n"), "{text}");
    assert!(text.contains("| mlaan-dgl (async, 2 stages) | 8 |"), "{text}");
    assert!(text.contains("- mlaan-dgl (async, 2 stages) vs mlaan-dgl: -1.00 points"), "{text}");
    assert!(text.contains("| mlaan-dgl (ema_update=last) | 8 |"), "{text}");
    assert!(text.trim_end().ends_with("<!-- /ablation -->"), "{text}");
    // Written again from fewer runs, the section is replaced, not appended.
    let again = compare(&["seq", "async"]);
    assert_eq!(again.matches("<!-- ablation -->").count(), 1, "{again}");
    assert!(!again.contains("ema_update=last"), "{again}");
    assert!(again.contains("the methods table"), "{again}");
}

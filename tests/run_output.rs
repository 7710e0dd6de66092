//! What a person sees of a run: TensorBoard event files that TensorBoard's own reader
//! accepts, `curves.png` without a second command, logs without escape codes when stderr is
//! a file, run directories named by date and time, and the announcement line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn debug_config() -> String {
    root().join("configs/debug.toml").display().to_string()
}

/// The binary with info logging, run in `cwd`, stderr into `stderr_file` when one is given.
fn train(cwd: &Path, args: &[&str], stderr_file: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"));
    cmd.arg("train")
        .args(args)
        .current_dir(cwd)
        .env("MLAAN_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("MLAAN_DATA_DIR");
    if let Some(f) = stderr_file {
        cmd.stderr(Stdio::from(std::fs::File::create(f).expect("stderr file")));
    }
    let o = cmd.output().expect("the binary starts");
    assert!(
        o.status.success(),
        "train {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The project's venv python, which `make test` (scripts/setup.sh --dev) gives TensorBoard.
fn tensorboard_python() -> PathBuf {
    let py = root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup.sh --dev (make test does) to install TensorBoard",
        py.display()
    );
    py
}

/// Reads a run directory with TensorBoard's EventAccumulator (which checks every record's
/// CRCs and drops what it cannot parse); prints `{"scalars": {tag: [steps]}, "text": {tag:
/// [strings]}}`.
const READ_EVENTS: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
acc.Reload()
tags = acc.Tags()
out = {
    "scalars": {t: [e.step for e in acc.Scalars(t)] for t in tags["scalars"]},
    "text": {t: [v.decode() for e in acc.Tensors(t) for v in e.tensor_proto.string_val]
             for t in tags["tensors"]},
}
print(json.dumps(out))
"#;

fn read_events(dir: &Path) -> serde_json::Value {
    let o = Command::new(tensorboard_python())
        .args(["-c", READ_EVENTS])
        .arg(dir)
        .output()
        .expect("python starts");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "TensorBoard's reader failed:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
}

/// The names of the entries of `dir`.
fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Steps of the `kind` records in metrics.jsonl.
fn record_steps(run: &Path, kind: &str) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|r| r["kind"] == kind)
        .map(|r| r["step"].as_u64().expect("step"))
        .collect()
}

#[test]
fn tensorboard_reads_every_tag_with_one_point_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = debug_config();
    let args = ["--config", &cfg, "--epochs", "2", "--set", "train.eval_every_epoch=true"];
    train(dir.path(), &[&args[..], &["--out", run.to_str().unwrap()]].concat(), None);

    let files: Vec<String> =
        file_names(&run).into_iter().filter(|n| n.starts_with("events.out.tfevents.")).collect();
    assert_eq!(files.len(), 1, "one event file: {files:?}");

    let train_steps = record_steps(&run, "train");
    let eval_steps = record_steps(&run, "eval");
    assert!(train_steps.len() >= 6, "2 epochs of 8 steps, logged every 2: {train_steps:?}");
    assert_eq!(eval_steps.len(), 2, "one evaluation per epoch");

    // MLAAN on DGL with K = 3 and cascade depth 2: module 0 has no loss of its own (only the
    // cascade of module 1 reaches it), module 1 an independent and a cascade loss, module 2
    // the network's classifier; two stages (two devices); modules 1 and 2 have heads.
    let mut per_train_record = vec![
        "train/loss".to_string(),
        "train/lr".into(),
        "train/images_per_s".into(),
        "train/skipped_batches".into(),
        "loss/module1/independent".into(),
        "loss/module1/cascade".into(),
        "loss/module2/final".into(),
    ];
    for s in 0..2 {
        for m in [
            "images_per_s",
            "busy",
            "wait_input",
            "wait_output",
            "wait_grad",
            "grad_lag",
            "live_bytes",
        ] {
            per_train_record.push(format!("{m}/stage{s}"));
        }
        for p in ["forward", "terms", "backward_input", "backward_params", "optimizer", "ema"] {
            per_train_record.push(format!("phase/{p}/stage{s}"));
        }
    }
    let per_eval_record =
        ["eval/accuracy", "eval/loss", "eval/module1/accuracy", "eval/module2/accuracy"];

    let events = read_events(&run);
    let scalars = events["scalars"].as_object().expect("scalars");
    let steps_of = |tag: &str| -> Vec<u64> {
        let v = scalars.get(tag).unwrap_or_else(|| panic!("no tag {tag} in {:?}", scalars.keys()));
        v.as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect()
    };
    for tag in &per_train_record {
        assert_eq!(steps_of(tag), train_steps, "{tag}");
    }
    for tag in per_eval_record {
        assert_eq!(steps_of(tag), eval_steps, "{tag}");
    }
    let expected = per_train_record.len() + per_eval_record.len();
    assert_eq!(scalars.len(), expected, "unexpected tags: {:?}", scalars.keys());

    let config = &events["text"]["config"];
    let text = config[0].as_str().unwrap_or_else(|| panic!("config text: {events}"));
    assert!(text.contains("name = \"mlaan-dgl\"") && text.contains("tensorboard = true"), "{text}");

    // The curves came with the run, without `mlaan-pipe plot`.
    let png = std::fs::read(run.join("curves.png")).expect("curves.png written by the run");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn tensorboard_off_writes_no_event_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = debug_config();
    let args = ["--config", &cfg, "--max-steps", "4", "--set", "train.tensorboard=false"];
    train(dir.path(), &[&args[..], &["--out", run.to_str().unwrap()]].concat(), None);
    let names = file_names(&run);
    assert!(!names.iter().any(|n| n.contains("tfevents")), "{names:?}");
    assert!(names.iter().any(|n| n == "curves.png"), "{names:?}");
}

#[test]
fn a_log_written_to_a_file_has_no_escape_codes_and_keeps_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("train.log");
    let cfg = debug_config();
    let args = ["--config", &cfg, "--epochs", "2", "--set", "train.eval_every_epoch=true"];
    train(dir.path(), &args, Some(&log));
    let bytes = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!bytes.contains(&0x1b), "escape codes in a log file:\n{text:?}");
    // Lines printed during the run reach the file (they are not drawn on a hidden bar).
    for want in
        ["training mlaan-dgl resnet8 K=3", "epoch 0: test accuracy", "epoch 1: test accuracy"]
    {
        assert!(text.contains(want), "`{want}` missing from the log:\n{text}");
    }
}

#[test]
fn the_default_run_directory_reads_as_method_arch_date_time() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = debug_config();
    let o = train(dir.path(), &["--config", &cfg, "--max-steps", "2"], None);
    let runs = file_names(&dir.path().join("runs"));
    assert_eq!(runs.len(), 1, "{runs:?}");
    let stamp = runs[0].strip_prefix("mlaan-dgl-resnet8-").unwrap_or_else(|| panic!("{runs:?}"));
    let (date, time) = stamp.split_once('-').unwrap_or_else(|| panic!("{stamp}"));
    assert!(date.len() == 8 && time.len() == 6, "{stamp}");
    assert!(date.bytes().chain(time.bytes()).all(|b| b.is_ascii_digit()), "{stamp}");
    // The final line names it.
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("runs/{}", runs[0])));
}

#[test]
fn one_e2e_module_is_announced_as_backprop_not_as_a_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = debug_config();
    let args = ["--config", &cfg, "--method", "e2e", "--k", "1", "--max-steps", "2"];
    let o = train(dir.path(), &[&args[..], &["--out", "run"]].concat(), None);
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err.lines().find(|l| l.contains("training e2e")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("end-to-end back-propagation, one stage"), "{line}");
    assert!(!line.contains("schedule"), "{line}");
}

/// What a terminal shows of `train ARGS`: the run under a pseudo-terminal made by `script`
/// (util-linux, in every Debian), with `NO_COLOR` set or not.
fn train_on_a_terminal(cwd: &Path, args: &[&str], no_color: bool) -> String {
    let quoted: Vec<String> = std::iter::once(env!("CARGO_BIN_EXE_mlaan-pipe"))
        .chain(std::iter::once("train"))
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let mut cmd = Command::new("script");
    cmd.args(["-qefc", &quoted.join(" "), "/dev/null"])
        .current_dir(cwd)
        .env("MLAAN_LOG", "info")
        .env("TERM", "xterm")
        .env_remove("MLAAN_DATA_DIR");
    if no_color {
        cmd.env("NO_COLOR", "1");
    } else {
        cmd.env_remove("NO_COLOR");
    }
    let o = cmd.stdin(Stdio::null()).output().expect("script (util-linux) starts");
    let screen = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "train under a terminal failed:\n{screen}");
    screen
}

/// `ESC [ digits ; … m`: a colour (SGR) sequence, as opposed to the cursor moves of the bar.
fn has_colour_codes(s: &str) -> bool {
    s.split('\x1b').skip(1).any(|rest| {
        let Some(params) = rest.strip_prefix('[') else { return false };
        let end = params.find(|c: char| !(c.is_ascii_digit() || c == ';'));
        end.is_some_and(|i| params[i..].starts_with('m'))
    })
}

#[test]
fn a_terminal_gets_colour_unless_no_color_and_a_bar_with_images_per_s() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = debug_config();
    let args = ["--config", &cfg, "--epochs", "3", "--set", "data.synthetic_samples=512"];
    let run = |out: &str, no_color| {
        train_on_a_terminal(dir.path(), &[&args[..], &["--out", out]].concat(), no_color)
    };
    let coloured = run("a", false);
    assert!(has_colour_codes(&coloured), "no colour on a terminal:\n{coloured:?}");
    assert!(coloured.contains("img/s") && coloured.contains("busy"), "no bar:\n{coloured:?}");
    let plain = run("b", true);
    assert!(!has_colour_codes(&plain), "colour despite NO_COLOR:\n{plain:?}");
    assert!(plain.contains("img/s"), "NO_COLOR keeps the bar:\n{plain:?}");
    assert!(!has_colour_codes("\x1b[2K\x1b[1A") && has_colour_codes("\x1b[2m"));
}

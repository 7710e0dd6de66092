//! The tiny debug config trains: its loss falls and its accuracy beats chance, through the
//! binary, with the default (async, two-stage) schedule.

use std::process::Command;

#[test]
fn debug_config_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_mlaan-pipe"))
        .args(["train", "--config", "configs/debug.toml", "--epochs", "4", "--out"])
        .arg(&out)
        .env("MLAAN_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = records
        .iter()
        .filter(|r| r["kind"] == "train")
        .filter_map(|r| r["loss"].as_f64())
        .collect();
    assert!(losses.len() >= 8, "{losses:?}");
    let head: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let tail: f64 = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(tail < 0.7 * head, "loss did not fall: {losses:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "4 classes: chance is 0.25, got {acc}");
    // Per-stage metrics are in the summary.
    assert_eq!(summary["stages"].as_array().unwrap().len(), 2);
}

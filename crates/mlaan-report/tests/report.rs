//! Markdown figures checked against hand-computed ratios; plots checked as PNG files.
//! Set `MLAAN_REPORT_KEEP=<dir>` to keep the rendered pictures for a look.

use std::path::{Path, PathBuf};

use mlaan_core::bench::{AllocatorPeak, BenchReport, CaseResult, StageShare};
use mlaan_core::metrics::{MetricRecord, StageWindow};
use mlaan_report::{
    bench_markdown, bench_plots, read_bench, read_metrics, training_plots, ReportError,
};

const MIB: u64 = 1024 * 1024;

fn stage(i: usize, device: &str, busy: f64, wi: f64, wo: f64, wg: f64, mib: u64) -> StageShare {
    StageShare {
        stage: i,
        device: device.into(),
        modules: vec![2 * i, 2 * i + 1],
        busy,
        wait_input: wi,
        wait_output: wo,
        wait_grad: wg,
        peak_live_bytes: mib * MIB,
        ..Default::default()
    }
}

fn case(name: &str, ips: &[f64], stages: Vec<StageShare>) -> CaseResult {
    let mut devices: Vec<String> = stages.iter().map(|s| s.device.clone()).collect();
    devices.dedup();
    CaseResult {
        name: name.into(),
        method: name.split(' ').next().unwrap_or_default().into(),
        schedule: if name.contains("async") { "async" } else { "sync" }.into(),
        devices,
        k: stages.len(),
        micro_batches: 4,
        replicas: 1,
        images_per_s: ips.to_vec(),
        stages,
        gpu_peak_bytes: vec![],
        allocator: vec![],
        reducers: vec![],
    }
}

fn allocator(peaks: &[(&str, u64)]) -> Vec<AllocatorPeak> {
    peaks
        .iter()
        .map(|&(d, m)| AllocatorPeak {
            device: d.into(),
            peak_allocated_bytes: m * MIB,
            peak_reserved_bytes: (m + m / 4) * MIB,
        })
        .collect()
}

fn report() -> BenchReport {
    let mut r = BenchReport {
        arch: "resnet32".into(),
        dataset: "cifar10".into(),
        input: [3, 32, 32],
        batch_size: 128,
        k: 2,
        devices: vec!["cuda:0".into(), "cuda:1".into()],
        warmup_steps: 20,
        timed_steps: 100,
        repeats: 3,
        memory_note: "exact live-tensor accounting; NVML peaks per device".into(),
        peak_rss_bytes: Some(2048 * MIB),
        cases: vec![
            case(
                "e2e",
                &[100.0, 110.0, 90.0],
                vec![stage(0, "cuda:0", 0.97, 0.02, 0.0, 0.0, 1000)],
            ),
            case(
                "gpipe",
                &[150.0, 160.0, 140.0],
                vec![
                    stage(0, "cuda:0", 0.70, 0.05, 0.10, 0.12, 600),
                    stage(1, "cuda:1", 0.75, 0.20, 0.0, 0.02, 500),
                ],
            ),
            case(
                "dgl async",
                &[180.0, 190.0, 170.0],
                vec![
                    stage(0, "cuda:0", 0.91, 0.01, 0.05, 0.0, 400),
                    stage(1, "cuda:1", 0.88, 0.09, 0.0, 0.0, 450),
                ],
            ),
            case(
                "mlaan sync",
                &[120.0],
                vec![
                    stage(0, "cuda:0", 0.60, 0.02, 0.08, 0.25, 300),
                    stage(1, "cuda:1", 0.65, 0.30, 0.0, 0.0, 350),
                ],
            ),
        ],
    };
    r.cases[0].allocator = allocator(&[("cuda:0", 1200)]);
    r.cases[2].allocator = allocator(&[("cuda:0", 300), ("cuda:1", 380)]);
    r
}

fn row<'a>(md: &'a str, name: &str) -> &'a str {
    md.lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row for {name} in\n{md}"))
}

fn cells(row: &str) -> Vec<&str> {
    row.trim_matches('|').split('|').map(str::trim).collect()
}

#[test]
fn markdown_ratios() {
    let r = report();
    let md = bench_markdown(&r);
    assert!(md.contains("resnet32 · cifar10 · input 3×32×32 · batch 128 · K = 2"), "{md}");
    assert!(md.contains("20 warm-up + 100 timed steps · 3 repeats"), "{md}");

    // Medians: e2e 100, gpipe 150, dgl 180, mlaan 120. Largest stage peaks: 1000, 600, 450, 350 MiB.
    let e2e = cells(row(&md, "e2e"));
    assert_eq!(
        e2e,
        [
            "e2e",
            "1",
            "100.0 (90.0–110.0)",
            "1.00",
            "0.67",
            "1.00",
            "97",
            "2/0/0 (s0)",
            "1000.0",
            "1.00",
            "1200.0"
        ]
    );
    let gpipe = cells(row(&md, "gpipe"));
    // 150/100 = 1.50; 1.50 / 2 devices = 0.75; 600/1000 = 0.60; stage 0 waits most (27%).
    assert_eq!(
        gpipe,
        [
            "gpipe",
            "2",
            "150.0 (140.0–160.0)",
            "1.50",
            "1.00",
            "0.75",
            "70/75",
            "5/10/12 (s0)",
            "600.0",
            "0.60",
            "—"
        ]
    );
    let dgl = cells(row(&md, "dgl async"));
    // 180/100 = 1.80, 180/150 = 1.20, 1.80/2 = 0.90, 450/1000 = 0.45.
    assert_eq!(
        dgl,
        [
            "dgl async",
            "2",
            "180.0 (170.0–190.0)",
            "1.80",
            "1.20",
            "0.90",
            "91/88",
            "9/0/0 (s1)",
            "450.0",
            "0.45",
            "380.0"
        ]
    );
    let mlaan = cells(row(&md, "mlaan sync"));
    // One repeat: no range. 120/100 = 1.20, 120/150 = 0.80, 0.60, 350/1000 = 0.35.
    assert_eq!(
        mlaan,
        [
            "mlaan sync",
            "2",
            "120.0",
            "1.20",
            "0.80",
            "0.60",
            "60/65",
            "2/8/25 (s0)",
            "350.0",
            "0.35",
            "—"
        ]
    );

    // Per-stage breakdown, memory note and RSS.
    assert!(md.contains("| 1 | cuda:1 | 2–3 | 88 | 9 | 0 | 0 | 450.0 |"), "{md}");
    assert!(md.contains("Memory: exact live-tensor accounting"), "{md}");
    assert!(md.contains("Peak RSS: 2048.0 MiB"), "{md}");
    assert!(
        md.contains("Allocator peak (allocated / reserved): cuda:0 300.0 / 375.0 MiB, cuda:1 380.0 / 475.0 MiB"),
        "{md}"
    );
}

#[test]
fn markdown_dashes_where_ratios_do_not_apply() {
    let mut r = report();
    r.cases.retain(|c| c.name != "gpipe");
    r.cases[0].stages[0].peak_live_bytes = 0; // e2e memory unknown
    r.peak_rss_bytes = None;
    let md = bench_markdown(&r);
    let dgl = cells(row(&md, "dgl async"));
    assert_eq!(dgl[3], "1.80");
    assert_eq!(dgl[4], "—", "no gpipe case: {md}");
    assert_eq!(dgl[9], "—", "no e2e memory: {md}");
    let e2e = cells(row(&md, "e2e"));
    assert_eq!(e2e[8], "—");
    assert!(md.contains("Peak RSS: not measured"));

    // Without e2e nothing is relative to it.
    r.cases.retain(|c| c.name != "e2e");
    let md = bench_markdown(&r);
    let dgl = cells(row(&md, "dgl async"));
    assert_eq!(&dgl[3..6], ["—", "—", "—"]);
}

fn keep_dir(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("MLAAN_REPORT_KEEP")?).join(name);
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert!(b.len() > 5_000, "{} is only {} bytes", path.display(), b.len());
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        assert!(!name.to_string_lossy().starts_with('.'), "left behind: {name:?}");
    }
}

#[test]
fn bench_plots_are_pngs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("plots"); // created on demand
    let files = bench_plots(&report(), &dir).unwrap();
    let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["throughput.png", "stages.png", "memory.png"]);
    assert_eq!(png_size(&files[0]), (900, 540));
    assert_eq!(png_size(&files[1]).0, 900);
    assert!(png_size(&files[1]).1 >= 540);
    assert_eq!(png_size(&files[2]), (900, 540));
    no_temp_files(&dir);
    if let Some(keep) = keep_dir("bench") {
        bench_plots(&report(), &keep).unwrap();
    }

    let empty = BenchReport::default();
    let err = bench_plots(&empty, &dir).unwrap_err();
    assert!(matches!(err, ReportError::NothingToPlot { .. }), "{err}");

    // bench.json round trip through the reader.
    let json = dir.join("bench.json");
    std::fs::write(&json, serde_json::to_string(&report()).unwrap()).unwrap();
    assert_eq!(read_bench(&json).unwrap(), report());
    std::fs::write(&json, "{").unwrap();
    assert!(read_bench(&json).unwrap_err().to_string().contains("bench.json"));
}

/// Ten cases with long names, one without stages, one without repeats: labels must not
/// collide (they rotate), and nothing may fail.
#[test]
fn many_cases_render() {
    let mut r = report();
    for i in 0..6 {
        let mut c = r.cases[2].clone();
        c.name = format!("mlaan-infopro async micro-batches {}", 2 << i);
        c.images_per_s = c.images_per_s.iter().map(|v| v * (1.0 + 0.1 * i as f64)).collect();
        r.cases.push(c);
    }
    r.cases.push(CaseResult {
        name: "no stages".into(),
        images_per_s: vec![95.0],
        devices: vec!["cpu".into()],
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let files = bench_plots(&r, tmp.path()).unwrap();
    for f in &files {
        png_size(f);
    }
    if let Some(keep) = keep_dir("many") {
        bench_plots(&r, &keep).unwrap();
    }
    assert!(bench_markdown(&r)
        .contains("| no stages | 1 | 95.0 | 0.95 | 0.63 | 0.95 | — | — | — | — |"));
}

fn metrics_lines(steps: u64, evals: &[u64]) -> String {
    let mut out = String::new();
    for s in 1..=steps {
        let x = s as f64;
        let loss =
            if s == 7 { f64::NAN } else { 2.3 * (-x / 60.0).exp() + 0.1 + 0.05 * (x * 1.3).sin() };
        let rec = MetricRecord::Train {
            step: s * 10,
            epoch: (s / 50) as usize,
            loss,
            lr: 0.1,
            images_per_s: 1500.0 + 80.0 * (x / 9.0).sin(),
            elapsed_s: x,
            skipped_batches: 0,
            stages: vec![StageWindow { stage: 0, device: "cpu".into(), ..Default::default() }],
        };
        // serde_json writes the NaN loss as `null`; the reader must take it back.
        let line = serde_json::to_string(&rec).unwrap();
        assert_eq!(s == 7, line.contains("\"loss\":null"));
        out += &line;
        out.push('\n');
    }
    for (i, &e) in evals.iter().enumerate() {
        let a = 0.45 + 0.4 * (1.0 - (-(i as f64 + 1.0) / 2.0).exp());
        let rec = MetricRecord::Eval {
            step: e,
            epoch: i,
            test_accuracy: a,
            test_loss: 1.0 - a,
            module_accuracy: vec![Some(a * 0.6), None, Some(a * 0.85), Some(a)],
        };
        out += &serde_json::to_string(&rec).unwrap();
        out.push('\n');
    }
    out
}

#[test]
fn training_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run-1");
    std::fs::create_dir_all(&run).unwrap();
    let metrics = run.join("metrics.jsonl");
    std::fs::write(&metrics, metrics_lines(200, &[400, 800, 1200, 1600, 2000])).unwrap();
    let records = read_metrics(&metrics).unwrap();
    assert_eq!(records.len(), 205);
    assert!(matches!(&records[6], MetricRecord::Train { loss, .. } if loss.is_nan()));
    let files = training_plots(&metrics, &run.join("plots")).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(png_size(&files[0]), (1100, 760));
    no_temp_files(&run.join("plots"));
    if let Some(keep) = keep_dir("train") {
        training_plots(&metrics, &keep).unwrap();
    }

    // A single eval point and a handful of steps.
    std::fs::write(&metrics, metrics_lines(5, &[50])).unwrap();
    let files = training_plots(&metrics, &run).unwrap();
    png_size(&files[0]);
    if let Some(keep) = keep_dir("train-short") {
        training_plots(&metrics, &keep).unwrap();
    }

    // Only evaluations.
    std::fs::write(&metrics, metrics_lines(0, &[50])).unwrap();
    png_size(&training_plots(&metrics, &run).unwrap()[0]);
}

#[test]
fn bad_metrics_files_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join("metrics.jsonl");

    std::fs::write(&metrics, "").unwrap();
    let err = training_plots(&metrics, tmp.path()).unwrap_err();
    assert!(matches!(err, ReportError::Empty { .. }));
    assert!(err.to_string().contains("metrics.jsonl"), "{err}");

    std::fs::write(&metrics, "\n  \n").unwrap();
    assert!(matches!(read_metrics(&metrics).unwrap_err(), ReportError::Empty { .. }));

    let good = metrics_lines(3, &[]);
    std::fs::write(&metrics, format!("{good}not json at all\n{good}")).unwrap();
    let err = training_plots(&metrics, tmp.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReportError::BadRecord { line: 4, .. }), "{msg}");
    assert!(msg.contains("metrics.jsonl:4:"), "{msg}");

    // A record of an unknown kind is as bad as garbage.
    std::fs::write(&metrics, "{\"kind\":\"weird\",\"step\":1}\n").unwrap();
    let msg = read_metrics(&metrics).unwrap_err().to_string();
    assert!(msg.contains("metrics.jsonl:1:"), "{msg}");

    // A torn last line after good records (a writer mid-append) is left out.
    std::fs::write(&metrics, format!("{good}{{\"kind\":\"tra")).unwrap();
    assert_eq!(read_metrics(&metrics).unwrap().len(), 3);

    let missing = tmp.path().join("nope.jsonl");
    let msg = read_metrics(&missing).unwrap_err().to_string();
    assert!(msg.contains("nope.jsonl"), "{msg}");

    // Only NaN losses and nothing else: nothing to plot, but no panic.
    let nan = "{\"kind\":\"train\",\"step\":1,\"epoch\":0,\"loss\":null,\"lr\":0.1,\"images_per_s\":null,\"elapsed_s\":1.0}\n";
    std::fs::write(&metrics, nan).unwrap();
    let _ = training_plots(&metrics, tmp.path());
}

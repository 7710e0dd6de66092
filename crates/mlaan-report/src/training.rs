//! Training curves from `metrics.jsonl`.

use std::path::{Path, PathBuf};

use mlaan_core::metrics::MetricRecord;
use plotters::prelude::*;

use crate::draw::{
    color, decimals, draw_legend, draw_note, font, legend_height, padded, render_png, Area,
    DrawResult, LegendItem, Swatch, GRID, GRID_BOLD, INK,
};
use crate::ReportError;

pub const CURVES_PNG: &str = "curves.png";

const SIZE: (u32, u32) = (1100, 760);

/// Reads every record of a `metrics.jsonl`. Blank lines are skipped. A line that is not a
/// record is an error naming the file and the line (from 1), except an unterminated last
/// line after good records: a writer still appending it, which is left out.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(path, e))?;
    let mut out = vec![];
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match parse_record(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !out.is_empty() => {} // torn last line
            Err(source) => {
                return Err(ReportError::BadRecord {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source,
                })
            }
        }
    }
    if out.is_empty() {
        return Err(ReportError::Empty { path: path.to_path_buf() });
    }
    Ok(out)
}

/// Stands in for a `null` where a number belongs, until it becomes NaN again.
const NULL_NUMBER: f64 = f64::MAX;
const TRAIN_NUMBERS: [&str; 6] =
    ["loss", "lr", "images_per_s", "elapsed_s", "test_accuracy", "test_loss"];
const STAGE_NUMBERS: [&str; 6] =
    ["images_per_s", "busy_ms", "wait_input_ms", "wait_output_ms", "wait_grad_ms", "wall_ms"];

/// One record. `serde_json` writes a NaN or infinite `f64` as `null`, which it then refuses to
/// read back as `f64`; such nulls are read as NaN here (and skipped when plotting).
fn parse_record(line: &str) -> Result<MetricRecord, serde_json::Error> {
    let first = match serde_json::from_str::<MetricRecord>(line) {
        Ok(r) => return Ok(r),
        Err(e) => e,
    };
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line) else {
        return Err(first);
    };
    let sentinel = || serde_json::Value::from(NULL_NUMBER);
    let fill = |obj: &mut serde_json::Value, keys: &[&str]| {
        if let Some(o) = obj.as_object_mut() {
            for k in keys {
                if let Some(x) = o.get_mut(*k).filter(|x| x.is_null()) {
                    *x = sentinel();
                }
            }
        }
    };
    fill(&mut v, &TRAIN_NUMBERS);
    if let Some(stages) = v.get_mut("stages").and_then(|s| s.as_array_mut()) {
        for s in stages {
            fill(s, &STAGE_NUMBERS);
            if let Some(losses) = s.get_mut("loss").and_then(|l| l.as_array_mut()) {
                for l in losses.iter_mut().filter(|l| l.is_null()) {
                    *l = sentinel();
                }
            }
        }
    }
    let mut r: MetricRecord = serde_json::from_value(v).map_err(|_| first)?;
    let nan = |x: &mut f64| {
        if *x == NULL_NUMBER {
            *x = f64::NAN;
        }
    };
    match &mut r {
        MetricRecord::Train { loss, lr, images_per_s, elapsed_s, stages, .. } => {
            for x in [loss, lr, images_per_s, elapsed_s] {
                nan(x);
            }
            for s in stages {
                for x in [
                    &mut s.images_per_s,
                    &mut s.busy_ms,
                    &mut s.wait_input_ms,
                    &mut s.wait_output_ms,
                    &mut s.wait_grad_ms,
                    &mut s.wall_ms,
                ] {
                    nan(x);
                }
                s.loss.iter_mut().for_each(nan);
            }
        }
        MetricRecord::Eval { test_accuracy, test_loss, .. } => {
            nan(test_accuracy);
            nan(test_loss);
        }
    }
    Ok(r)
}

/// One line of a panel.
struct Series {
    label: String,
    color: RGBColor,
    width: u32,
    /// Dashed, so that a line drawn over another one leaves it visible.
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Renders `curves.png` into `dir` (created if missing) from the records of `metrics_jsonl`:
/// training loss against step (top left), test accuracy against step with one line per
/// module that has a head (top right), images/s against step (bottom). Non-finite values are
/// skipped. Returns the paths written.
pub fn training_plots(metrics_jsonl: &Path, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let records = read_metrics(metrics_jsonl)?;

    let mut loss = vec![];
    let mut ips = vec![];
    let mut acc = vec![];
    let mut modules: Vec<Vec<(f64, f64)>> = vec![];
    let mut evals = vec![];
    for r in &records {
        match r {
            MetricRecord::Train { step, loss: l, images_per_s, .. } => {
                let x = *step as f64;
                if l.is_finite() {
                    loss.push((x, *l));
                }
                if images_per_s.is_finite() && *images_per_s >= 0.0 {
                    ips.push((x, *images_per_s));
                }
            }
            MetricRecord::Eval { step, test_accuracy, module_accuracy, .. } => {
                let x = *step as f64;
                evals.push(x);
                if test_accuracy.is_finite() {
                    acc.push((x, *test_accuracy));
                }
                if modules.len() < module_accuracy.len() {
                    modules.resize(module_accuracy.len(), vec![]);
                }
                for (m, a) in module_accuracy.iter().enumerate() {
                    if let Some(a) = a.filter(|a| a.is_finite()) {
                        modules[m].push((x, a));
                    }
                }
            }
        }
    }
    if loss.is_empty() && ips.is_empty() && acc.is_empty() && modules.iter().all(Vec::is_empty) {
        return Err(ReportError::NothingToPlot {
            path: metrics_jsonl.to_path_buf(),
            what: "no finite loss, accuracy or throughput values".into(),
        });
    }

    // Accuracies are fractions; show them in per cent.
    let all_acc = acc.iter().chain(modules.iter().flatten());
    let scale = if all_acc.clone().all(|p| p.1 <= 1.0 + 1e-9) { 100.0 } else { 1.0 };
    let to_pct = |v: &[(f64, f64)]| v.iter().map(|&(x, y)| (x, y * scale)).collect::<Vec<_>>();

    // One step axis for all panels so they line up.
    let steps = loss.iter().chain(&ips).map(|p| p.0).chain(evals.iter().copied());
    let (lo, hi) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    // A little room at both ends so that end markers are not cut.
    let x_range = if hi > lo { padded(lo, hi, 0.015) } else { padded(lo, hi, 0.0) };

    let mut loss_series = vec![];
    if loss.len() >= 30 {
        loss_series.push(Series {
            label: "loss".into(),
            color: RGBColor(160, 185, 215),
            width: 1,
            dashed: false,
            points: loss.clone(),
        });
        loss_series.push(Series {
            label: "moving average".into(),
            color: color(0),
            width: 3,
            dashed: false,
            points: smooth(&loss),
        });
    } else {
        loss_series.push(Series {
            label: "loss".into(),
            color: color(0),
            width: 2,
            dashed: false,
            points: loss,
        });
    }

    // Module lines first; the network's output last, so it is drawn on top (its last module
    // usually has the same accuracy).
    let mut acc_series = vec![];
    for (m, points) in modules.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        acc_series.push(Series {
            label: format!("module {m}"),
            color: color(acc_series.len() + 1),
            width: 3,
            dashed: false,
            points: to_pct(points),
        });
    }
    acc_series.push(Series {
        label: "network output".into(),
        color: INK,
        width: 2,
        dashed: true,
        points: to_pct(&acc),
    });

    let ips_series = vec![Series {
        label: "images/s".into(),
        color: color(4),
        width: 2,
        dashed: false,
        points: ips,
    }];
    let acc_unit = if scale == 100.0 { "test accuracy (%)" } else { "test accuracy" };
    let title = metrics_jsonl
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| format!("Training — {}", n.to_string_lossy()))
        .unwrap_or_else(|| "Training".into());

    let path = render_png(&dir.join(CURVES_PNG), SIZE, |root| {
        let body = root.margin(6, 0, 0, 0).titled(&title, font(22.0))?;
        let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 * 64 / 100);
        let (left, right) = top.split_horizontally(top.dim_in_pixel().0 / 2);
        panel(
            &left,
            "Training loss",
            "loss",
            &loss_series,
            x_range,
            false,
            "no finite training loss",
        )?;
        panel(
            &right,
            "Test accuracy",
            acc_unit,
            &acc_series,
            x_range,
            true,
            "no evaluation records",
        )?;
        panel(
            &bottom,
            "Throughput",
            "images / s",
            &ips_series,
            x_range,
            true,
            "no throughput figures",
        )?;
        Ok(())
    })?;
    Ok(vec![path])
}

/// Exponential moving average with a window of about a fiftieth of the run.
fn smooth(v: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let alpha = 2.0 / ((v.len() as f64 / 50.0).max(2.0) + 1.0);
    let mut out = Vec::with_capacity(v.len());
    let mut m = v.first().map_or(0.0, |p| p.1);
    for &(x, y) in v {
        m += alpha * (y - m);
        out.push((x, m));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn panel(
    area: &Area,
    title: &str,
    y_desc: &str,
    series: &[Series],
    (x0, x1): (f64, f64),
    from_zero: bool,
    empty: &str,
) -> DrawResult {
    let area = area.margin(4, 4, 8, 8);
    let area = area.titled(title, font(17.0))?;
    let drawn: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    let legend: Vec<LegendItem> = if drawn.len() > 1 {
        drawn
            .iter()
            .map(|s| {
                let swatch = if s.dashed { Swatch::Dashed } else { Swatch::Line };
                LegendItem::new(s.label.clone(), s.color, swatch)
            })
            .collect()
    } else {
        vec![]
    };
    let (legend_area, area) = area.split_vertically(legend_height(&area, &legend));
    draw_legend(&legend_area, &legend)?;

    let (lo, hi) = drawn
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
    let (y0, y1) = if drawn.is_empty() {
        (0.0, 1.0)
    } else if from_zero && lo >= 0.0 {
        let (_, h) = padded(lo, hi, 0.08);
        (0.0, h.max(f64::MIN_POSITIVE))
    } else {
        padded(lo, hi, 0.06)
    };
    let mut chart = ChartBuilder::on(&area)
        .margin(6)
        .margin_right(16)
        .x_label_area_size(44)
        .y_label_area_size(66)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let dy = decimals(y1 - y0);
    let dx = decimals(x1 - x0);
    chart
        .configure_mesh()
        .light_line_style(GRID)
        .max_light_lines(1)
        .bold_line_style(GRID_BOLD)
        .x_labels(8)
        .y_labels((area.dim_in_pixel().1 / 45).clamp(3, 8) as usize)
        .x_label_formatter(&|v| format!("{v:.dx$}"))
        .y_label_formatter(&|v| format!("{v:.dy$}"))
        .x_desc("step")
        .y_desc(y_desc)
        .axis_desc_style(font(14.0))
        .label_style(font(12.0))
        .draw()?;
    if drawn.is_empty() {
        return draw_note(&area, empty);
    }
    for s in drawn {
        if s.points.len() > 1 && s.dashed {
            chart.draw_series(DashedLineSeries::new(
                s.points.iter().copied(),
                9,
                5,
                s.color.stroke_width(s.width),
            ))?;
        } else if s.points.len() > 1 {
            chart.draw_series(LineSeries::new(
                s.points.iter().copied(),
                s.color.stroke_width(s.width),
            ))?;
        }
        if s.points.len() <= 40 && s.width > 1 {
            chart.draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, if s.dashed { 3 } else { 4 }, s.color.filled())),
            )?;
        }
    }
    Ok(())
}

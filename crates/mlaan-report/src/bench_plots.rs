//! Plots of a benchmark run: throughput per case, stage time shares, memory per stage.

use std::path::{Path, PathBuf};

use mlaan_core::bench::BenchReport;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::draw::{
    color, decimals, draw_legend, draw_note, draw_x_labels, fit, font, legend_height, mib,
    render_png, text_on, text_width, x_labels, Area, DrawResult, LegendItem, Swatch, GRID,
    GRID_BOLD, INK, REFERENCE,
};
use crate::ReportError;

pub const THROUGHPUT_PNG: &str = "throughput.png";
pub const STAGES_PNG: &str = "stages.png";
pub const MEMORY_PNG: &str = "memory.png";

const SIZE: (u32, u32) = (900, 540);
const TITLE: f64 = 22.0;
const AXIS: f64 = 15.0;
const TICKS: f64 = 13.0;
const Y_AREA: u32 = 78;

/// Renders `throughput.png`, `stages.png` and `memory.png` for `r` into `dir` (created if
/// missing) and returns their paths in that order.
pub fn bench_plots(r: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if r.cases.is_empty() {
        return Err(ReportError::NothingToPlot {
            path: dir.to_path_buf(),
            what: "the bench report has no cases".into(),
        });
    }
    Ok(vec![
        render_png(&dir.join(THROUGHPUT_PNG), SIZE, |root| throughput(root, r))?,
        render_png(&dir.join(STAGES_PNG), stages_size(r), |root| stages(root, r))?,
        render_png(&dir.join(MEMORY_PNG), SIZE, |root| memory(root, r))?,
    ])
}

fn subtitle(r: &BenchReport) -> String {
    let mut parts = vec![];
    if !r.arch.is_empty() {
        parts.push(r.arch.clone());
    }
    if !r.dataset.is_empty() {
        parts.push(r.dataset.clone());
    }
    if r.batch_size > 0 {
        parts.push(format!("batch {}", r.batch_size));
    }
    if r.k > 0 {
        parts.push(format!("K = {}", r.k));
    }
    parts.join(" · ")
}

/// Title (with the run's setup) on top; returns the area below it.
fn titled<'a>(
    root: &Area<'a>,
    title: &str,
    r: &BenchReport,
) -> Result<Area<'a>, Box<dyn std::error::Error>> {
    let sub = subtitle(r);
    let full = if sub.is_empty() { title.to_string() } else { format!("{title} — {sub}") };
    let w = root.dim_in_pixel().0;
    let text = fit(root, &full, &font(TITLE), w - 20);
    Ok(root.margin(6, 0, 0, 0).titled(&text, font(TITLE))?)
}

/// Vertical bars with case names underneath; shared by throughput and memory.
struct CategoryChart<'a> {
    area: Area<'a>,
    labels: crate::draw::XLabels,
}

fn category_layout<'a>(root: &Area<'a>, body: Area<'a>, names: &[String]) -> CategoryChart<'a> {
    let plot_width = body.dim_in_pixel().0.saturating_sub(Y_AREA + 30);
    let labels = x_labels(root, names, plot_width);
    CategoryChart { area: body, labels }
}

fn throughput(root: &Area, r: &BenchReport) -> DrawResult {
    let body = titled(root, "Throughput", r)?;
    let e2e = r.cases.iter().find(|c| c.name == "e2e").map(|c| c.median());
    let repeated = r.cases.iter().any(|c| c.images_per_s.len() > 1);
    let mut legend = vec![LegendItem::new("median images/s", color(0), Swatch::Box)];
    if repeated {
        legend.push(LegendItem::new("min–max over repeats", INK, Swatch::ErrorBar));
    }
    if let Some(e) = e2e {
        legend.push(LegendItem::new(
            format!("e2e median ({e:.1} images/s)"),
            REFERENCE,
            Swatch::Dashed,
        ));
    }
    let (legend_area, body) = body.split_vertically(legend_height(&body, &legend));
    draw_legend(&legend_area, &legend)?;

    let names: Vec<String> = r.cases.iter().map(|c| c.name.clone()).collect();
    let cc = category_layout(root, body, &names);
    let n = r.cases.len();
    let top = r
        .cases
        .iter()
        .map(|c| if c.images_per_s.is_empty() { 0.0 } else { c.max() })
        .chain(e2e)
        .fold(0.0f64, f64::max);
    let ymax = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(&cc.area)
        .margin(10)
        .margin_right(20)
        .x_label_area_size(cc.labels.area_height + 24)
        .y_label_area_size(Y_AREA)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0.0..ymax)?;
    let d = decimals(ymax);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(GRID)
        .max_light_lines(1)
        .bold_line_style(GRID_BOLD)
        .x_labels(0)
        .y_label_formatter(&|v| format!("{v:.d$}"))
        .y_desc("images / s")
        .x_desc("case")
        .axis_desc_style(font(AXIS))
        .label_style(font(TICKS))
        .draw()?;

    let half = 0.36;
    chart.draw_series(r.cases.iter().enumerate().map(|(i, c)| {
        let x = i as f64;
        Rectangle::new([(x - half, 0.0), (x + half, c.median())], color(i).filled())
    }))?;
    // Min–max whiskers with caps.
    for (i, c) in r.cases.iter().enumerate() {
        if c.images_per_s.len() < 2 {
            continue;
        }
        let (x, cap) = (i as f64, 0.08);
        let st = INK.stroke_width(2);
        for seg in [
            [(x, c.min()), (x, c.max())],
            [(x - cap, c.min()), (x + cap, c.min())],
            [(x - cap, c.max()), (x + cap, c.max())],
        ] {
            chart.draw_series(std::iter::once(PathElement::new(seg.to_vec(), st)))?;
        }
    }
    if let Some(e) = e2e {
        chart.draw_series(DashedLineSeries::new(
            vec![(-0.5, e), (n as f64 - 0.5, e)],
            10,
            6,
            REFERENCE.stroke_width(2),
        ))?;
    }
    // The median above each bar (above its error bar), when it fits the bar's slot.
    let value_style = font(12.0).pos(Pos::new(HPos::Center, VPos::Bottom));
    let slot = chart.plotting_area().get_pixel_range().0.len() as u32 / n.max(1) as u32;
    for (i, c) in r.cases.iter().enumerate() {
        if c.images_per_s.is_empty() {
            let (x, y) = chart.backend_coord(&(i as f64, 0.0));
            root.draw(&Text::new("n/a", (x, y - 4), value_style.clone().color(&REFERENCE)))?;
            continue;
        }
        let s = format!("{:.1}", c.median());
        if text_width(root, &s, &value_style) + 4 > slot {
            continue;
        }
        let (x, y) = chart.backend_coord(&(i as f64, c.max()));
        root.draw(&Text::new(s, (x, y - 4), value_style.clone()))?;
    }
    let xs: Vec<i32> = (0..n).map(|i| chart.backend_coord(&(i as f64, 0.0)).0).collect();
    let axis_y = chart.backend_coord(&(0.0, 0.0)).1;
    draw_x_labels(root, &cc.labels, &xs, axis_y)?;
    Ok(())
}

/// One bar of the stage chart.
struct StageRow {
    label: String,
    pos: f64,
    shares: [f64; 5],
}

const SHARE_NAMES: [&str; 5] = ["busy", "wait input", "wait output", "wait grad", "other"];
const SHARE_COLORS: [RGBColor; 5] = [
    RGBColor(89, 161, 79),
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(200, 200, 200),
];

fn stage_rows(r: &BenchReport) -> Vec<StageRow> {
    let mut rows = vec![];
    let mut pos = 0.0;
    for (ci, case) in r.cases.iter().enumerate() {
        if ci > 0 && !case.stages.is_empty() && !rows.is_empty() {
            pos += 0.5; // a gap between cases
        }
        for s in &case.stages {
            let clamp = |v: f64| if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
            let (b, wi, wo, wg) =
                (clamp(s.busy), clamp(s.wait_input), clamp(s.wait_output), clamp(s.wait_grad));
            let other = (1.0 - (b + wi + wo + wg)).max(0.0);
            let device =
                if s.device.is_empty() { String::new() } else { format!(" ({})", s.device) };
            rows.push(StageRow {
                label: format!("{} · s{}{}", case.name, s.stage, device),
                pos,
                shares: [b, wi, wo, wg, if other > 0.005 { other } else { 0.0 }],
            });
            pos += 1.0;
        }
    }
    rows
}

fn stages_size(r: &BenchReport) -> (u32, u32) {
    let rows = stage_rows(r);
    let extent = rows.last().map_or(0.0, |s| s.pos + 1.0);
    let h = 190.0 + extent * 30.0;
    (SIZE.0, (h as u32).clamp(SIZE.1, 1600))
}

fn stages(root: &Area, r: &BenchReport) -> DrawResult {
    let body = titled(root, "Stage time shares", r)?;
    let rows = stage_rows(r);
    let any_other = rows.iter().any(|s| s.shares[4] > 0.0);
    let legend: Vec<LegendItem> = (0..if any_other { 5 } else { 4 })
        .map(|k| LegendItem::new(SHARE_NAMES[k], SHARE_COLORS[k], Swatch::Box))
        .collect();
    let (legend_area, body) = body.split_vertically(legend_height(&body, &legend));
    draw_legend(&legend_area, &legend)?;
    if rows.is_empty() {
        return draw_note(&body, "no stage figures in this report");
    }

    let label_style = font(CATEGORY);
    let max_label = body.dim_in_pixel().0 * 2 / 5;
    let labels: Vec<String> =
        rows.iter().map(|s| fit(root, &s.label, &label_style, max_label)).collect();
    let widest = labels.iter().map(|l| text_width(root, l, &label_style)).max().unwrap_or(0);
    let extent = rows.last().map_or(1.0, |s| s.pos + 1.0);
    // Rows top to bottom: y runs from `extent` (top) down to 0.
    let y_of = |pos: f64| extent - pos - 0.5;
    let mut chart = ChartBuilder::on(&body)
        .margin(10)
        .margin_right(24)
        .x_label_area_size(48)
        .y_label_area_size(widest + 16)
        .build_cartesian_2d(0.0..100.0, 0.0..extent)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(GRID)
        .max_light_lines(1)
        .bold_line_style(GRID_BOLD)
        .y_labels(0)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("% of stage wall time (median repetition)")
        .axis_desc_style(font(AXIS))
        .label_style(font(TICKS))
        .draw()?;

    let half = 0.36;
    let pct_style = font(12.0).pos(Pos::new(HPos::Center, VPos::Center));
    for row in &rows {
        let y = y_of(row.pos);
        let mut x0 = 0.0;
        for (k, &share) in row.shares.iter().enumerate() {
            if share <= 0.0 {
                continue;
            }
            let x1 = (x0 + share * 100.0).min(100.0);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, y - half), (x1, y + half)],
                SHARE_COLORS[k].filled(),
            )))?;
            let text = format!("{:.0}%", share * 100.0);
            let (px0, py) = chart.backend_coord(&((x0 + x1) / 2.0, y));
            let bar_px = chart.backend_coord(&(x1, y)).0 - chart.backend_coord(&(x0, y)).0;
            if text_width(root, &text, &pct_style) as i32 + 6 <= bar_px {
                root.draw(&Text::new(
                    text,
                    (px0, py),
                    pct_style.clone().color(&text_on(SHARE_COLORS[k])),
                ))?;
            }
            x0 = x1;
        }
    }
    let left = chart.backend_coord(&(0.0, 0.0)).0;
    let style = label_style.pos(Pos::new(HPos::Right, VPos::Center));
    for (row, label) in rows.iter().zip(labels) {
        let (_, py) = chart.backend_coord(&(0.0, y_of(row.pos)));
        root.draw(&Text::new(label, (left - 8, py), style.clone()))?;
    }
    Ok(())
}

const CATEGORY: f64 = crate::draw::CATEGORY_FONT;

/// Whether two spellings of a device name the same one (`cuda:0`, `Cuda(0)`).
fn same_device(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric()).collect()
    };
    norm(a) == norm(b)
}

fn memory(root: &Area, r: &BenchReport) -> DrawResult {
    let body = titled(root, "Peak live memory per stage", r)?;
    let e2e =
        r.cases.iter().find(|c| c.name == "e2e").map(|c| c.max_stage_bytes()).filter(|&b| b > 0);
    let max_stages = r.cases.iter().map(|c| c.stages.len()).max().unwrap_or(0);
    let mut legend: Vec<LegendItem> = (0..max_stages)
        .map(|s| LegendItem::new(format!("stage {s}"), color(s), Swatch::Box))
        .collect();
    if let Some(e) = e2e {
        legend.push(LegendItem::new(
            format!("e2e peak ({:.1} MiB)", mib(e)),
            REFERENCE,
            Swatch::Dashed,
        ));
    }
    let allocator = r.cases.iter().any(|c| c.max_allocator_bytes() > 0);
    if allocator {
        legend.push(LegendItem::new("allocator peak of the stage's GPU", INK, Swatch::Line));
    }
    let (legend_area, body) = body.split_vertically(legend_height(&body, &legend));
    draw_legend(&legend_area, &legend)?;
    let top = r.cases.iter().map(|c| c.max_stage_bytes().max(c.max_allocator_bytes())).max();
    let top = top.unwrap_or(0);
    if top == 0 {
        return draw_note(&body, "no memory figures in this report");
    }

    let names: Vec<String> = r.cases.iter().map(|c| c.name.clone()).collect();
    let cc = category_layout(root, body, &names);
    let n = r.cases.len();
    let ymax = mib(top) * 1.15;
    let mut chart = ChartBuilder::on(&cc.area)
        .margin(10)
        .margin_right(20)
        .x_label_area_size(cc.labels.area_height + 24)
        .y_label_area_size(Y_AREA)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0.0..ymax)?;
    let d = decimals(ymax);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(GRID)
        .max_light_lines(1)
        .bold_line_style(GRID_BOLD)
        .x_labels(0)
        .y_label_formatter(&|v| format!("{v:.d$}"))
        .y_desc("peak live MiB")
        .x_desc("case")
        .axis_desc_style(font(AXIS))
        .label_style(font(TICKS))
        .draw()?;

    let group = 0.8;
    let value_style = font(11.0).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, c) in r.cases.iter().enumerate() {
        let k = c.stages.len();
        if c.max_stage_bytes() == 0 {
            let (px, py) = chart.backend_coord(&(i as f64, 0.0));
            root.draw(&Text::new("n/a", (px, py - 4), value_style.clone().color(&REFERENCE)))?;
            continue;
        }
        let w = group / k as f64;
        for (j, s) in c.stages.iter().enumerate() {
            let x0 = i as f64 - group / 2.0 + j as f64 * w;
            let v = mib(s.peak_live_bytes);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0 + w * 0.06, 0.0), (x0 + w * 0.94, v)],
                color(j).filled(),
            )))?;
            let text = format!("{v:.d$}", d = decimals(v).max(if v < 10.0 { 1 } else { 0 }));
            let (px, py) = chart.backend_coord(&(x0 + w / 2.0, v));
            let bar_px = chart.backend_coord(&(x0 + w, v)).0 - chart.backend_coord(&(x0, v)).0;
            if v > 0.0 && text_width(root, &text, &value_style) as i32 + 2 <= bar_px {
                root.draw(&Text::new(text, (px, py - 3), value_style.clone()))?;
            }
            // Over each stage, the allocator peak of its device (which every stage on that
            // device shares).
            let on_device = c.allocator.iter().find(|a| same_device(&a.device, &s.device));
            if let Some(a) = on_device.filter(|a| a.peak_allocated_bytes > 0) {
                let v = mib(a.peak_allocated_bytes);
                let line = vec![(x0 + w * 0.02, v), (x0 + w * 0.98, v)];
                chart.draw_series(LineSeries::new(line, INK.stroke_width(3)))?;
            }
        }
    }
    if let Some(e) = e2e {
        chart.draw_series(DashedLineSeries::new(
            vec![(-0.5, mib(e)), (n as f64 - 0.5, mib(e))],
            10,
            6,
            REFERENCE.stroke_width(2),
        ))?;
    }
    let xs: Vec<i32> = (0..n).map(|i| chart.backend_coord(&(i as f64, 0.0)).0).collect();
    let axis_y = chart.backend_coord(&(0.0, 0.0)).1;
    draw_x_labels(root, &cc.labels, &xs, axis_y)?;
    Ok(())
}

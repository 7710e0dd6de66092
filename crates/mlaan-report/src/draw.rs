//! Shared drawing helpers: the embedded font, colours, atomic PNG output, legends and
//! category labels that never overlap.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::ReportError;

pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
pub(crate) type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// DejaVu Sans 2.37 (Bitstream Vera licence, see `assets/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
pub(crate) const FAMILY: &str = "sans-serif";

/// Registers the embedded font under every family name plotters may ask for. With the
/// `ab_glyph` feature plotters never looks at system fonts, so a machine without any still
/// draws text.
pub(crate) fn ensure_font() -> Result<(), ReportError> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        ["sans-serif", "serif", "monospace", "Arial", "Helvetica"]
            .iter()
            .all(|name| plotters::style::register_font(name, FontStyle::Normal, FONT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(ReportError::Font)
    }
}

pub(crate) fn font(size: f64) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font()).color(&INK)
}

pub(crate) const INK: RGBColor = RGBColor(35, 35, 35);
pub(crate) const GRID: RGBColor = RGBColor(238, 238, 238);
pub(crate) const GRID_BOLD: RGBColor = RGBColor(200, 200, 200);
pub(crate) const REFERENCE: RGBColor = RGBColor(90, 90, 90);

/// Tableau 10: distinct and colour-blind friendly.
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(89, 161, 79),
    RGBColor(237, 201, 72),
    RGBColor(176, 122, 161),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(186, 176, 172),
];

pub(crate) fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Black or white, whichever reads better on `c`.
pub(crate) fn text_on(c: RGBColor) -> RGBColor {
    let l = 0.299 * c.0 as f64 + 0.587 * c.1 as f64 + 0.114 * c.2 as f64;
    if l > 150.0 {
        INK
    } else {
        WHITE
    }
}

/// A file name in the same folder as `path` that no other writer uses; it keeps `path`'s
/// extension so that the bitmap backend picks the right encoder.
pub(crate) fn temp_path(path: &Path, ext: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = N.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}-{n}.{ext}", std::process::id()))
}

/// Renders a PNG of `size` pixels with `draw` and moves it to `path` in one rename.
pub(crate) fn render_png<F>(path: &Path, size: (u32, u32), draw: F) -> Result<PathBuf, ReportError>
where
    F: FnOnce(&Area) -> DrawResult,
{
    ensure_font()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ReportError::io(dir, e))?;
    }
    let tmp = temp_path(path, "png");
    let drawn = (|| -> DrawResult {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(ReportError::Draw { path: path.to_path_buf(), message: e.to_string() });
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ReportError::io(path, e)
    })?;
    Ok(path.to_path_buf())
}

pub(crate) fn text_width(area: &Area, text: &str, style: &TextStyle) -> u32 {
    area.estimate_text_size(text, style).map(|s| s.0).unwrap_or(0)
}

/// `text` cut to at most `max_px` wide by an ellipsis in the middle, so that names which
/// differ only at the end (`… micro-batches 4`, `… micro-batches 8`) stay apart.
pub(crate) fn fit(area: &Area, text: &str, style: &TextStyle, max_px: u32) -> String {
    if text_width(area, text, style) <= max_px {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut keep = chars.len();
    while keep > 1 {
        keep -= 1;
        let head = keep.div_ceil(2);
        let tail = keep - head;
        let s: String = chars[..head]
            .iter()
            .chain(std::iter::once(&'…'))
            .chain(&chars[chars.len() - tail..])
            .collect();
        if text_width(area, &s, style) <= max_px {
            return s;
        }
    }
    "…".to_string()
}

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
pub(crate) enum Swatch {
    Box,
    Line,
    Dashed,
    ErrorBar,
}

pub(crate) struct LegendItem {
    pub label: String,
    pub color: RGBColor,
    pub swatch: Swatch,
}

impl LegendItem {
    pub fn new(label: impl Into<String>, color: RGBColor, swatch: Swatch) -> Self {
        Self { label: label.into(), color, swatch }
    }
}

const LEGEND_FONT: f64 = 14.0;
const LEGEND_ROW: u32 = 22;
const SWATCH_W: i32 = 22;

fn legend_rows(area: &Area, items: &[LegendItem], width: u32) -> Vec<Vec<(usize, u32)>> {
    let style = font(LEGEND_FONT);
    let mut rows: Vec<Vec<(usize, u32)>> = vec![];
    let mut used = 0u32;
    for (i, item) in items.iter().enumerate() {
        let w = SWATCH_W as u32 + 6 + text_width(area, &item.label, &style) + 20;
        if rows.is_empty() || (used + w > width.saturating_sub(20) && used > 0) {
            rows.push(vec![]);
            used = 0;
        }
        rows.last_mut().expect("a row").push((i, w));
        used += w;
    }
    rows
}

/// Height a legend of `items` needs when laid out in rows across `area`.
pub(crate) fn legend_height(area: &Area, items: &[LegendItem]) -> u32 {
    if items.is_empty() {
        return 0;
    }
    legend_rows(area, items, area.dim_in_pixel().0).len() as u32 * LEGEND_ROW + 6
}

/// Draws `items` in centred rows across the top of `area`.
pub(crate) fn draw_legend(area: &Area, items: &[LegendItem]) -> DrawResult {
    let width = area.dim_in_pixel().0;
    let style = font(LEGEND_FONT).pos(Pos::new(HPos::Left, VPos::Center));
    for (r, row) in legend_rows(area, items, width).iter().enumerate() {
        let total: u32 = row.iter().map(|(_, w)| w).sum::<u32>().saturating_sub(20);
        let mut x = (width.saturating_sub(total) / 2) as i32;
        let y = (r as u32 * LEGEND_ROW + LEGEND_ROW / 2 + 3) as i32;
        for &(i, w) in row {
            let item = &items[i];
            let c = item.color;
            match item.swatch {
                Swatch::Box => {
                    area.draw(&Rectangle::new([(x, y - 7), (x + SWATCH_W, y + 7)], c.filled()))?;
                }
                Swatch::Line => {
                    area.draw(&PathElement::new(
                        vec![(x, y), (x + SWATCH_W, y)],
                        c.stroke_width(3),
                    ))?;
                }
                Swatch::Dashed => {
                    for s in [0, 9, 18] {
                        area.draw(&PathElement::new(
                            vec![(x + s, y), (x + (s + 5).min(SWATCH_W), y)],
                            c.stroke_width(2),
                        ))?;
                    }
                }
                Swatch::ErrorBar => {
                    let m = x + SWATCH_W / 2;
                    let st = c.stroke_width(2);
                    area.draw(&PathElement::new(vec![(m, y - 8), (m, y + 8)], st))?;
                    area.draw(&PathElement::new(vec![(m - 5, y - 8), (m + 5, y - 8)], st))?;
                    area.draw(&PathElement::new(vec![(m - 5, y + 8), (m + 5, y + 8)], st))?;
                }
            }
            area.draw(&Text::new(item.label.clone(), (x + SWATCH_W + 6, y), style.clone()))?;
            x += w as i32;
        }
    }
    Ok(())
}

/// Category labels under an x axis: horizontal when they fit their slot, else rotated to
/// read upwards. Returns the label area height the chart must reserve and the labels (cut
/// with an ellipsis when longer than a third of the picture).
pub(crate) struct XLabels {
    pub labels: Vec<String>,
    pub rotate: bool,
    pub area_height: u32,
}

pub(crate) const CATEGORY_FONT: f64 = 14.0;

pub(crate) fn x_labels(area: &Area, names: &[String], plot_width: u32) -> XLabels {
    let style = font(CATEGORY_FONT);
    let (_, h) = area.dim_in_pixel();
    let max_len = h / 3;
    let labels: Vec<String> = names.iter().map(|n| fit(area, n, &style, max_len)).collect();
    let widest = labels.iter().map(|l| text_width(area, l, &style)).max().unwrap_or(0);
    let slot = plot_width / names.len().max(1) as u32;
    let rotate = widest + 10 > slot;
    let area_height = if rotate { widest + 18 } else { 30 };
    XLabels { labels, rotate, area_height }
}

/// Draws the labels of [`x_labels`] at backend pixel `xs`, just below `axis_y`, on the root.
pub(crate) fn draw_x_labels(root: &Area, l: &XLabels, xs: &[i32], axis_y: i32) -> DrawResult {
    let style = font(CATEGORY_FONT);
    let style = if l.rotate {
        style.transform(FontTransform::Rotate270).pos(Pos::new(HPos::Right, VPos::Center))
    } else {
        style.pos(Pos::new(HPos::Center, VPos::Top))
    };
    for (label, &x) in l.labels.iter().zip(xs) {
        root.draw(&Text::new(label.clone(), (x, axis_y + 8), style.clone()))?;
    }
    Ok(())
}

/// Number of decimals that tell apart ticks spaced over `span`.
pub(crate) fn decimals(span: f64) -> usize {
    if !span.is_finite() || span >= 20.0 {
        0
    } else if span >= 2.0 {
        1
    } else if span >= 0.2 {
        2
    } else {
        3
    }
}

/// `lo..hi` widened by `pad` of its span on each side (and made non-empty).
pub(crate) fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * pad;
    (lo - d, hi + d)
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A message in the middle of an area that had nothing to draw.
pub(crate) fn draw_note(area: &Area, msg: &str) -> DrawResult {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        msg.to_string(),
        (w as i32 / 2, h as i32 / 2),
        font(16.0).color(&REFERENCE).pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded font draws glyphs without any system font.
    #[test]
    fn text_is_drawn() {
        ensure_font().unwrap();
        let (w, h) = (160u32, 40u32);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let area = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            assert!(text_width(&area, "images / s", &font(16.0)) > 40);
            area.draw(&Text::new("Hg 123 ×—…", (4, 8), font(20.0))).unwrap();
            area.present().unwrap();
        }
        let dark = buf.chunks(3).filter(|p| p.iter().all(|&c| c < 100)).count();
        assert!(dark > 100, "only {dark} dark pixels: no text drawn");
    }

    #[test]
    fn long_names_keep_both_ends() {
        ensure_font().unwrap();
        let mut buf = vec![255u8; 3 * 100 * 100];
        let area = BitMapBackend::with_buffer(&mut buf, (100, 100)).into_drawing_area();
        let s = fit(&area, "mlaan-infopro async micro-batches 64", &font(14.0), 120);
        assert!(s.starts_with("mlaan") && s.ends_with("64") && s.contains('…'), "{s}");
        assert!(text_width(&area, &s, &font(14.0)) <= 120);
        assert_eq!(fit(&area, "e2e", &font(14.0), 120), "e2e");
    }

    #[test]
    fn ranges() {
        assert_eq!(padded(1.0, 1.0, 0.1), (0.9, 1.1));
        assert_eq!(padded(0.0, 0.0, 0.1), (-1.0, 1.0));
        assert_eq!(padded(f64::INFINITY, 1.0, 0.1), (0.0, 1.0));
        assert_eq!(decimals(1000.0), 0);
        assert_eq!(decimals(0.5), 2);
    }
}

//! Training metrics: a JSONL log (one object per logged step) and a loss-curve PNG drawn with
//! the `image` crate (axes, tick marks, optional log-scale y axis).

use crate::error::{Error, IoContext, Result};
use image::{Rgb, RgbImage};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricsRecord {
    pub step: u64,
    /// Mean loss over the steps since the previous record.
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    /// Global gradient norm (before clipping) of the last step.
    pub grad_norm: f64,
    /// Seconds since the start of this run of the loop.
    pub elapsed_s: f64,
    /// Wall-clock time, seconds since the Unix epoch.
    pub unix_time: f64,
    /// Further figures of the step function (e.g. an auxiliary loss), window means.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extras: std::collections::BTreeMap<String, f64>,
}

/// Append-only JSONL metrics file. Resumed runs keep appending; readers keep the last record
/// of each step.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_path(parent)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_path(&path)?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&mut self, rec: &MetricsRecord) -> Result<()> {
        let mut line = serde_json::to_string(rec).map_err(|e| Error::invalid("metrics record", e.to_string()))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).with_path(&self.path)?;
        self.file.flush().with_path(&self.path)
    }

    /// All records, sorted by step, the last one written winning for a repeated step.
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<MetricsRecord>> {
        let by_step: std::collections::BTreeMap<u64, MetricsRecord> =
            read_jsonl::<MetricsRecord>(path.as_ref())?.into_iter().map(|r| (r.step, r)).collect();
        Ok(by_step.into_values().collect())
    }
}

/// Every record of a JSON-lines file, in file order (blank lines skipped); a line that does
/// not parse is an error naming the file and the line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_path(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::bad_file(path, format!("line {}: {e}", i + 1))))
        .collect()
}

#[derive(Clone, Debug)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    pub log_y: bool,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self { width: 640, height: 400, log_y: false }
    }
}

const MARGIN: i64 = 40;
const AXIS: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const LINE: Rgb<u8> = Rgb([31, 119, 180]);
/// Colours of further series ([`plot_loss_series`]), in order.
const SERIES: [Rgb<u8>; 3] = [Rgb([255, 127, 14]), Rgb([44, 160, 44]), Rgb([214, 39, 40])];

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham line, `thick` pixels wide (vertically).
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>, thick: i64) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for t in 0..thick {
            put(img, x, y + t, c);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// 3x5 pixel glyphs (rows top to bottom, 3 bits each, high bit left) of the characters the
/// plot's labels use.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        'a' => [0, 6, 1, 7, 7],
        'c' => [0, 7, 4, 4, 7],
        'd' => [1, 1, 7, 5, 7],
        'e' => [7, 5, 7, 4, 7],
        'g' => [0, 7, 5, 7, 1],
        'i' => [2, 0, 2, 2, 2],
        'l' => [4, 4, 4, 4, 6],
        'o' => [0, 7, 5, 5, 7],
        'p' => [7, 5, 7, 4, 4],
        's' => [0, 7, 6, 3, 7],
        't' => [2, 7, 2, 2, 3],
        ' ' => [0; 5],
        _ => return None,
    })
}

/// Pixel width of `text` drawn at `scale`.
fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 4 * scale - scale
}

/// Draw `text` with its top-left corner at (x, y), each glyph pixel `scale` x `scale`.
fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: i64, c: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        let Some(rows) = glyph(ch) else { continue };
        let gx = x + i as i64 * 4 * scale;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, gx + col * scale + dx, y + r as i64 * scale + dy, c);
                        }
                    }
                }
            }
        }
    }
}

/// Draw `text` rotated a quarter turn anticlockwise (reading bottom to top), its glyphs'
/// tops towards the left, starting at the bottom (x, y).
fn draw_text_up(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: i64, c: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        let Some(rows) = glyph(ch) else { continue };
        let gy = y - i as i64 * 4 * scale;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, x + r as i64 * scale + dx, gy - col * scale - dy, c);
                        }
                    }
                }
            }
        }
    }
}

/// A short tick label: integers as they are, others with 3 significant digits.
fn tick_label(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e7 {
        format!("{v:.0}")
    } else if v.abs() >= 0.01 && v.abs() < 1e4 {
        let digits = (2 - v.abs().log10().floor() as i64).clamp(0, 4) as usize;
        format!("{v:.digits$}")
    } else {
        format!("{v:.1e}")
    }
}

/// Draw the loss curve `points` = (step, loss) into a PNG at `path` (atomic write), with axis
/// labels ("step"; "loss", "loss (log)" on a log axis) and the values at the ends of each axis.
/// Points
/// with a non-finite loss (or a non-positive one on a log axis) are skipped.
pub fn plot_losses(points: &[(f64, f64)], path: impl AsRef<Path>, opts: &PlotOptions) -> Result<()> {
    plot_loss_series(points, &[], path, opts)
}

/// The (step, value) points of the extra figure `key` (e.g. `loss_distill`) of the records
/// that carry it.
pub fn extra_series(records: &[MetricsRecord], key: &str) -> Vec<(f64, f64)> {
    records.iter().filter_map(|r| r.extras.get(key).map(|&v| (r.step as f64, v))).collect()
}

/// [`plot_losses`] with further series on the same axes (each in its own colour, named in a
/// legend at the top right when it has points; names use the plot's small glyph set:
/// lower-case letters of "loss", "distill" and digits). Empty series are left out.
pub fn plot_loss_series(points: &[(f64, f64)], extra: &[(&str, &[(f64, f64)])], path: impl AsRef<Path>, opts: &PlotOptions) -> Result<()> {
    let path = path.as_ref();
    if opts.width < 2 * MARGIN as u32 + 10 || opts.height < 2 * MARGIN as u32 + 10 {
        return Err(Error::invalid("plot size", format!("{}x{} is too small", opts.width, opts.height)));
    }
    let ty = |v: f64| if opts.log_y { v.log10() } else { v };
    let keep = |points: &[(f64, f64)]| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!opts.log_y || *y > 0.0))
            .map(|&(x, y)| (x, ty(y)))
            .collect()
    };
    let main = keep(points);
    if main.is_empty() {
        return Err(Error::invalid("loss curve", "no finite points to plot"));
    }
    let others: Vec<(&str, Vec<(f64, f64)>)> = extra.iter().map(|(n, p)| (*n, keep(p))).filter(|(_, p)| !p.is_empty()).collect();
    // The axes span every series.
    let pts: Vec<(f64, f64)> = main.iter().chain(others.iter().flat_map(|(_, p)| p.iter())).copied().collect();
    let (w, h) = (opts.width as i64, opts.height as i64);
    let mut img = RgbImage::from_pixel(opts.width, opts.height, Rgb([255, 255, 255]));
    let min = |f: fn(&(f64, f64)) -> f64| pts.iter().map(f).fold(f64::INFINITY, f64::min);
    let max = |f: fn(&(f64, f64)) -> f64| pts.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
    let (x0, x1, mut y0, mut y1) = (min(|p| p.0), max(|p| p.0), min(|p| p.1), max(|p| p.1));
    if y1 - y0 < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let xspan = (x1 - x0).max(1e-12);
    let (pw, ph) = ((w - 2 * MARGIN) as f64, (h - 2 * MARGIN) as f64);
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = MARGIN as f64 + (x - x0) / xspan * pw;
        let py = (h - MARGIN) as f64 - (y - y0) / (y1 - y0) * ph;
        (px.round() as i64, py.round() as i64)
    };
    // Grid lines and ticks at tenths (decades on a log axis when the range spans them).
    for i in 0..=10 {
        let gx = MARGIN + (i * (w - 2 * MARGIN)) / 10;
        let gy = MARGIN + (i * (h - 2 * MARGIN)) / 10;
        line(&mut img, (gx, MARGIN), (gx, h - MARGIN), GRID, 1);
        line(&mut img, (MARGIN, gy), (w - MARGIN, gy), GRID, 1);
        line(&mut img, (gx, h - MARGIN), (gx, h - MARGIN + 5), AXIS, 1);
        line(&mut img, (MARGIN - 5, gy), (MARGIN, gy), AXIS, 1);
    }
    if opts.log_y {
        let mut d = y0.ceil();
        while d <= y1 {
            let (_, py) = to_px((x0, d));
            line(&mut img, (MARGIN - 10, py), (w - MARGIN, py), Rgb([180, 180, 180]), 1);
            d += 1.0;
        }
    }
    line(&mut img, (MARGIN, h - MARGIN), (w - MARGIN, h - MARGIN), AXIS, 2);
    line(&mut img, (MARGIN, MARGIN), (MARGIN, h - MARGIN), AXIS, 1);
    line(&mut img, (MARGIN + 1, MARGIN), (MARGIN + 1, h - MARGIN), AXIS, 1);
    // Axis labels and the range of each axis.
    let scale = 2;
    let x_label = "step";
    draw_text(&mut img, (w - text_width(x_label, scale)) / 2, h - MARGIN + 12, x_label, scale, AXIS);
    let (xl, xr) = (tick_label(x0), tick_label(x1));
    draw_text(&mut img, MARGIN, h - MARGIN + 8, &xl, 1, AXIS);
    draw_text(&mut img, w - MARGIN - text_width(&xr, 1), h - MARGIN + 8, &xr, 1, AXIS);
    let y_label = if opts.log_y { "loss (log)" } else { "loss" };
    draw_text_up(&mut img, 4, (h + text_width(y_label, scale)) / 2, y_label, scale, AXIS);
    let untransform = |v: f64| if opts.log_y { 10f64.powf(v) } else { v };
    let (yb, yt) = (tick_label(untransform(y0)), tick_label(untransform(y1)));
    draw_text(&mut img, (MARGIN - 8 - text_width(&yt, 1)).max(16), MARGIN - 8, &yt, 1, AXIS);
    draw_text(&mut img, (MARGIN - 8 - text_width(&yb, 1)).max(16), h - MARGIN - 8, &yb, 1, AXIS);
    let series = std::iter::once(("loss", &main, LINE)).chain(others.iter().zip(SERIES.iter().cycle()).map(|((n, p), c)| (*n, p, *c)));
    for (k, (name, points, colour)) in series.enumerate() {
        let px: Vec<(i64, i64)> = points.iter().map(|&p| to_px(p)).collect();
        if px.len() == 1 {
            line(&mut img, (px[0].0 - 2, px[0].1), (px[0].0 + 2, px[0].1), colour, 2);
        }
        for pair in px.windows(2) {
            line(&mut img, pair[0], pair[1], colour, 2);
        }
        if !others.is_empty() {
            let y = MARGIN + 6 + 12 * k as i64;
            let x = w - MARGIN - 6 - text_width(name, 2) - 16;
            line(&mut img, (x, y + 4), (x + 10, y + 4), colour, 2);
            draw_text(&mut img, x + 16, y, name, 2, colour);
        }
    }
    crate::imageio::save_rgb(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_plot_has_axis_labels() {
        let dir = std::env::temp_dir().join(format!("tokenar-plot-{}", std::process::id()));
        let path = dir.join("loss.png");
        let pts: Vec<(f64, f64)> = (1..=50).map(|i| (i as f64 * 10.0, 6.0 / (i as f64).sqrt())).collect();
        for log_y in [false, true] {
            plot_losses(&pts, &path, &PlotOptions { log_y, ..Default::default() }).unwrap();
            let img = image::open(&path).unwrap().to_rgb8();
            let (w, h) = (img.width() as i64, img.height() as i64);
            let dark = |x0: i64, x1: i64, y0: i64, y1: i64| {
                (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x as u32, y as u32)[0] < 100).count()
            };
            // The x label ("step") centred under the axis, below the tick marks.
            assert!(dark(w / 2 - 20, w / 2 + 20, h - MARGIN + 10, h) > 20, "no x-axis label");
            // The y label, rotated, left of the tick labels.
            assert!(dark(0, 16, MARGIN, h - MARGIN) > 20, "no y-axis label");
            // The axis ranges: first and last step under the axis ends, top and bottom loss.
            assert!(dark(MARGIN, MARGIN + 10, h - MARGIN + 7, h - MARGIN + 14) > 0, "no x range");
            assert!(dark(16, MARGIN - 6, MARGIN - 9, MARGIN - 2) > 0, "no y range");
        }
        assert_eq!(tick_label(500.0), "500");
        assert_eq!(tick_label(6.0 / 50f64.sqrt()), "0.849");
        assert!(tick_label(1e-5).contains('e'));
        assert!(tick_label(1e-5).chars().all(|c| glyph(c).is_some()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn extra_series_are_drawn_in_their_own_colour() {
        let dir = std::env::temp_dir().join(format!("tokenar-plot-series-{}", std::process::id()));
        let path = dir.join("loss.png");
        let rec = |step: u64, extra: Option<f64>| MetricsRecord {
            step,
            loss: 5.0 - step as f64 * 0.01,
            lr: 1e-3,
            tokens_per_s: 1.0,
            grad_norm: 1.0,
            elapsed_s: 0.0,
            unix_time: 0.0,
            extras: extra.map(|v| ("loss_distill".to_string(), v)).into_iter().collect(),
        };
        let recs: Vec<MetricsRecord> = (1..=20).map(|i| rec(i * 10, (i > 2).then(|| 1.0 / i as f64))).collect();
        let extra = extra_series(&recs, "loss_distill");
        assert_eq!(extra.len(), 18);
        assert_eq!(extra[0], (30.0, 1.0 / 3.0));
        let main: Vec<(f64, f64)> = recs.iter().map(|r| (r.step as f64, r.loss)).collect();
        let count = |c: Rgb<u8>| {
            let img = image::open(&path).unwrap().to_rgb8();
            img.pixels().filter(|p| **p == c).count()
        };
        plot_loss_series(&main, &[("distill", &extra)], &path, &PlotOptions { log_y: true, ..Default::default() }).unwrap();
        assert!(count(SERIES[0]) > 100, "the distill series is drawn");
        assert!(count(LINE) > 100);
        // Without the extra series (or with an empty one) nothing is drawn in its colour.
        plot_loss_series(&main, &[("distill", &[])], &path, &PlotOptions::default()).unwrap();
        assert_eq!(count(SERIES[0]), 0);
        assert!("distill".chars().all(|c| glyph(c).is_some()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

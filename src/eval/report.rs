//! Reports: result JSON (read/write), a markdown table laid out like the paper's tables (rows
//! = runs, columns = metrics, `mean ± half width of the 95% interval`), and a PNG grid of the
//! best and worst samples by one metric.

use super::metric::Column;
use super::run::{EvalResult, Row};
use crate::error::{Error, IoContext, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

pub fn write_json(path: impl AsRef<Path>, r: &EvalResult) -> Result<()> {
    let path = path.as_ref();
    let text = serde_json::to_string_pretty(r).map_err(|e| Error::bad_file(path, format!("cannot encode JSON: {e}")))?;
    crate::util::atomic_write(path, text.as_bytes())
}

pub fn read_json(path: impl AsRef<Path>) -> Result<EvalResult> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_path(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(path, format!("not an evaluation result: {e}")))
}

/// Decimals for a value of this magnitude (the interval is printed with the mean's decimals).
fn decimals(v: f64) -> usize {
    if v.abs() >= 100.0 { 1 } else if v.abs() >= 10.0 { 2 } else { 4 }
}

/// Markdown table: one row per run, one column per metric (union over runs, in first-seen
/// order; `select` restricts and orders them). Cells are `mean ± ci95`; set metrics show
/// their single score; `-` where a run lacks the metric. The best run per column is bold.
pub fn markdown_table(runs: &[EvalResult], select: Option<&[String]>) -> String {
    let mut cols: Vec<Column> = Vec::new();
    for r in runs {
        for c in &r.columns {
            if !cols.iter().any(|k| k.name == c.name) {
                cols.push(c.clone());
            }
        }
    }
    if let Some(sel) = select {
        cols = sel.iter().filter_map(|s| cols.iter().find(|c| &c.name == s).cloned()).collect();
    }
    let value = |r: &EvalResult, c: &Column| -> Option<(f64, Option<f64>)> {
        r.set_scores.get(&c.name).map(|v| (*v, None)).or_else(|| r.aggregates.get(&c.name).map(|s| (s.mean, s.ci95)))
    };
    let mut out = String::from("| Method |");
    for c in &cols {
        out += &format!(" {}{} |", c.label, if c.higher_is_better { "↑" } else { "↓" });
    }
    out += "\n|---|";
    out += &"---:|".repeat(cols.len());
    out += "\n";
    for r in runs {
        out += &format!("| {} |", r.name);
        for c in &cols {
            let best = runs
                .iter()
                .filter_map(|o| value(o, c).map(|v| v.0))
                .fold(None, |b: Option<f64>, v| Some(match b {
                    None => v,
                    Some(b) if c.higher_is_better => b.max(v),
                    Some(b) => b.min(v),
                }));
            out += &match value(r, c) {
                None => " - |".to_string(),
                Some((m, ci)) => {
                    let d = decimals(m);
                    let text = match ci {
                        Some(h) => format!("{m:.d$} ± {h:.d$}"),
                        None => format!("{m:.d$}"),
                    };
                    if runs.len() > 1 && best == Some(m) { format!(" **{text}** |") } else { format!(" {text} |") }
                }
            };
        }
        out += "\n";
    }
    let n: Vec<String> = runs.iter().map(|r| format!("{}: {} samples", r.name, r.rows.len() - r.failed())).collect();
    out += &format!("\n± = half width of the {}. {}.\n", super::run::CI_METHOD, n.join(", "));
    for r in runs {
        for s in &r.skipped {
            out += &format!("\n{}: metric `{}` skipped: {}", r.name, s.metric, s.reason);
        }
    }
    out
}

/// Markdown table per group: one row per (group value, run), grouped by `key` (`subjects` or
/// `relation`, see [`super::run::group_summaries`]), so that a model sits next to its ceiling
/// (e.g. the tokenizer's round trip) within each group. Cells are `mean ± ci95` of the samples
/// of that group; columns as in [`markdown_table`] (set metrics are not split by group and are
/// left out). `None` when no run has the key.
pub fn group_table(runs: &[EvalResult], key: &str, select: Option<&[String]>) -> Option<String> {
    let grouped: Vec<Vec<super::run::GroupSummary>> = runs.iter().map(|r| super::run::group_summaries(r, key)).collect();
    if grouped.iter().all(|g| g.is_empty()) {
        return None;
    }
    let mut cols: Vec<Column> = Vec::new();
    for r in runs {
        for c in r.columns.iter().filter(|c| !r.set_scores.contains_key(&c.name) && !r.set_features.contains_key(&c.name)) {
            if !cols.iter().any(|k| k.name == c.name) {
                cols.push(c.clone());
            }
        }
    }
    if let Some(sel) = select {
        cols = sel.iter().filter_map(|s| cols.iter().find(|c| &c.name == s).cloned()).collect();
    }
    // Group values in the order of the first run that has them (numbers by number).
    let mut values: Vec<String> = Vec::new();
    for g in &grouped {
        for v in g {
            if !values.contains(&v.value) {
                values.push(v.value.clone());
            }
        }
    }
    values.sort_by_key(|v| (v.parse::<u64>().unwrap_or(u64::MAX), v.clone()));
    let mut out = format!("| {key} | Method | n |");
    for c in &cols {
        out += &format!(" {}{} |", c.label, if c.higher_is_better { "↑" } else { "↓" });
    }
    out += "\n|---|---|---:|";
    out += &"---:|".repeat(cols.len());
    out += "\n";
    for v in &values {
        for (r, g) in runs.iter().zip(&grouped) {
            let Some(g) = g.iter().find(|g| &g.value == v) else { continue };
            out += &format!("| {v} | {} | {} |", r.name, g.samples);
            for c in &cols {
                out += &match g.aggregates.get(&c.name) {
                    None => " - |".to_string(),
                    Some(s) => {
                        let d = decimals(s.mean);
                        match s.ci95 {
                            Some(h) => format!(" {:.d$} ± {h:.d$} |", s.mean),
                            None => format!(" {:.d$} |", s.mean),
                        }
                    }
                };
            }
            out += "\n";
        }
    }
    out += &format!("\n± = half width of the {}, within each group.\n", super::run::CI_METHOD);
    Some(out)
}

/// The rows with a value in `column`, best first (ties in sample order).
fn ranked_rows<'a>(r: &'a EvalResult, column: &str) -> Result<Vec<(&'a Row, f64)>> {
    let col = r
        .columns
        .iter()
        .find(|c| c.name == column)
        .ok_or_else(|| Error::invalid("rank metric", format!("`{column}` is not a per-sample column of this result")))?;
    let mut rows: Vec<(&Row, f64)> =
        r.rows.iter().filter_map(|row| row.values.get(column).copied().flatten().map(|v| (row, v))).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.index.cmp(&b.0.index)));
    if !col.higher_is_better {
        rows.reverse();
    }
    Ok(rows)
}

/// The `k` best and `k` worst rows by `column` (best first, then worst with the worst last).
/// Rows without a value are left out; with fewer than 2k rows they are split about evenly and
/// the two lists share none.
pub fn best_and_worst<'a>(r: &'a EvalResult, column: &str, k: usize) -> Result<(Vec<&'a Row>, Vec<&'a Row>)> {
    let rows = ranked_rows(r, column)?;
    let kb = k.min(rows.len().div_ceil(2));
    let kw = k.min(rows.len() - kb);
    let best = rows[..kb].iter().map(|r| r.0).collect();
    let worst = rows[rows.len() - kw..].iter().map(|r| r.0).collect();
    Ok((best, worst))
}

/// The `k` best, `k` median and `k` worst rows by `column` (each list best first). Rows
/// without a value are left out; with fewer than 3k rows the three lists split them about
/// evenly and share none.
pub fn best_median_worst<'a>(r: &'a EvalResult, column: &str, k: usize) -> Result<[Vec<&'a Row>; 3]> {
    let rows = ranked_rows(r, column)?;
    let n = rows.len();
    let take = |r: std::ops::Range<usize>| -> Vec<&'a Row> { rows[r].iter().map(|x| x.0).collect() };
    if n >= 3 * k {
        let mid = (n - k) / 2;
        return Ok([take(0..k), take(mid..mid + k), take(n - k..n)]);
    }
    let n1 = n.div_ceil(3);
    let n2 = n1 + (n - n1).div_ceil(2);
    let (best, median, worst) = (take(0..n1), take(n1..n2), take(n2..n));
    Ok([best, median, worst])
}

/// A contact sheet: one block per list of rows (e.g. best, median, worst), each a grid of
/// `cols` samples per row, blocks separated by red bars. `load(row)` returns the panels of one
/// sample, laid side by side.
pub fn contact_sheet(blocks: &[Vec<&Row>], cols: usize, load: &mut dyn FnMut(&Row) -> Result<Vec<RgbImage>>) -> Result<RgbImage> {
    let mut strips = Vec::new();
    for rows in blocks.iter().filter(|b| !b.is_empty()) {
        let mut samples = Vec::new();
        for row in rows {
            let p = load(row)?;
            samples.push(crate::imageio::grid(&p, p.len(), 1));
        }
        strips.push(crate::imageio::grid(&samples, cols, 6));
    }
    let w = strips.iter().map(|s| s.width()).max().unwrap_or(1);
    let bar = 4;
    let h = strips.iter().map(|s| s.height()).sum::<u32>() + bar * strips.len().saturating_sub(1) as u32;
    let mut out = RgbImage::from_pixel(w, h.max(1), Rgb([255, 255, 255]));
    let mut y = 0;
    for (i, s) in strips.iter().enumerate() {
        if i > 0 {
            for yy in y..y + bar {
                for x in 0..w {
                    out.put_pixel(x, yy, Rgb([200, 30, 30]));
                }
            }
            y += bar;
        }
        image::imageops::replace(&mut out, s, 0, y as i64);
        y += s.height();
    }
    Ok(out)
}

/// One image: a row of panels per sample (e.g. target | prediction | mask), the best samples
/// on top, a red bar, then the worst. `load(row)` returns the panels of a sample.
pub fn best_worst_grid(
    best: &[&Row],
    worst: &[&Row],
    load: &mut dyn FnMut(&Row) -> Result<Vec<RgbImage>>,
) -> Result<RgbImage> {
    let mut strips = Vec::new();
    for rows in [best, worst] {
        let mut panels = Vec::new();
        let mut cols = 1;
        for row in rows {
            let p = load(row)?;
            cols = cols.max(p.len());
            panels.extend(p);
        }
        strips.push(crate::imageio::grid(&panels, cols, 2));
    }
    let w = strips.iter().map(|s| s.width()).max().unwrap_or(1);
    let bar = 4;
    let h = strips.iter().map(|s| s.height()).sum::<u32>() + bar;
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, &strips[0], 0, 0);
    for y in strips[0].height()..strips[0].height() + bar {
        for x in 0..w {
            out.put_pixel(x, y, Rgb([200, 30, 30]));
        }
    }
    image::imageops::replace(&mut out, &strips[1], 0, (strips[0].height() + bar) as i64);
    Ok(out)
}

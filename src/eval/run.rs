//! Scoring a dataset: per-sample rows, aggregates with 95% Student-t intervals, set scores,
//! sharding (`index % n == i`) and merging shard results into the unsharded result.

use super::identity::Subject;
use super::metric::{set_score_fn, BuiltMetrics, Column, Metric, MetricSpec, SampleData, Skipped};
use super::samples::EvalSample;
use super::stats::{summarize, Summary};
use crate::error::{Error, Result};
use crate::imageio;
use image::{imageops::FilterType, GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// How the aggregates' intervals are computed (recorded in every result).
pub const CI_METHOD: &str = "95% Student-t interval of the mean over samples: mean +- t(0.975, n-1) * sd / sqrt(n)";

#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Run name (a row of the markdown table).
    pub name: String,
    /// Evaluate at `size` x `size` (targets resized as the data loader does); `None` keeps the
    /// target's size. Predictions are always resized to the target's size.
    pub size: Option<u32>,
    /// Shard `(i, n)`: samples with `index % n == i`.
    pub shard: (usize, usize),
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { name: "run".into(), size: None, shard: (0, 1) }
    }
}

/// One sample's values (`None` = not applicable), or the error that stopped it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub index: usize,
    pub id: String,
    pub values: BTreeMap<String, Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The sample's groups (`subjects` -> "2", `relation` -> "next to"), for the per-group
    /// tables ([`group_summaries`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, String>,
}

/// One sample's features for a set metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureRow {
    pub index: usize,
    pub pred: Vec<f64>,
    pub target: Option<Vec<f64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub name: String,
    pub dataset: String,
    /// Folder of `<id>.png` predictions, when they were read from files.
    #[serde(default)]
    pub pred_dir: Option<String>,
    /// Evaluation size (`None` = each target's own size).
    #[serde(default)]
    pub size: Option<u32>,
    /// Number of samples in the whole dataset (all shards).
    pub dataset_samples: usize,
    /// `Some((i, n))` for one shard, `None` when the rows cover every shard.
    pub shard: Option<(usize, usize)>,
    pub columns: Vec<Column>,
    pub skipped: Vec<Skipped>,
    pub rows: Vec<Row>,
    pub ci: String,
    pub aggregates: BTreeMap<String, Summary>,
    pub set_scores: BTreeMap<String, f64>,
    #[serde(default)]
    pub set_features: BTreeMap<String, Vec<FeatureRow>>,
}

impl EvalResult {
    pub fn failed(&self) -> usize {
        self.rows.iter().filter(|r| r.error.is_some()).count()
    }

    /// An error when no sample was scored (no row, or every row failed), naming the first
    /// failure: such a run has no result to report.
    pub fn check_any_scored(&self) -> Result<()> {
        if self.rows.is_empty() {
            return Err(Error::invalid("evaluation", format!("no sample to score in {}", self.dataset)));
        }
        if self.failed() == self.rows.len() {
            let first = self.rows.iter().find_map(|r| r.error.as_deref().map(|e| format!("{}: {e}", r.id))).unwrap_or_default();
            return Err(Error::invalid("evaluation", format!("all {} samples failed, none was scored (first: {first})", self.rows.len())));
        }
        Ok(())
    }
}

fn resize_mask(m: GrayImage, (w, h): (u32, u32)) -> GrayImage {
    if m.dimensions() == (w, h) { m } else { image::imageops::resize(&m, w, h, FilterType::Nearest) }
}

/// Score one sample with every metric; `Err` stops only this sample.
fn score_sample(
    s: &EvalSample,
    pred: RgbImage,
    size: Option<u32>,
    metrics: &[Metric],
    values: &mut BTreeMap<String, Option<f64>>,
    features: &mut BTreeMap<String, Vec<FeatureRow>>,
) -> Result<()> {
    let target = s.target.as_ref().map(|p| imageio::load_rgb(p, size)).transpose()?;
    let dims = target.as_ref().map(|t| t.dimensions()).or(size.map(|s| (s, s))).unwrap_or(pred.dimensions());
    let pred = if pred.dimensions() == dims { pred } else { imageio::resize_rgb(&pred, dims.0, dims.1) };
    let mask = s.mask.as_ref().map(|p| imageio::load_mask(p, None).map(|m| resize_mask(m, dims))).transpose()?;
    let refs = s.refs.iter().map(|p| imageio::load_rgb(p, None)).collect::<Result<Vec<_>>>()?;
    let subjects = s
        .subjects
        .iter()
        .map(|(m, r)| {
            Ok(Subject { mask: resize_mask(imageio::load_mask(m, None)?, dims), reference: imageio::load_rgb(r, None)? })
        })
        .collect::<Result<Vec<_>>>()?;
    let d = SampleData::new(s, &pred, target.as_ref(), mask.as_ref(), &refs, &subjects);
    for m in metrics {
        match m {
            Metric::Sample(m) => {
                let v = m.score(&d)?;
                for (c, v) in m.columns().into_iter().zip(v) {
                    values.insert(c.name, v.filter(|x| x.is_finite()));
                }
            }
            Metric::Set { column, extractor, .. } => {
                let f = extractor.features(&d)?;
                features.entry(column.name.clone()).or_default().push(FeatureRow { index: s.index, pred: f.pred, target: f.target });
            }
        }
    }
    Ok(())
}

/// Score the samples of shard `opts.shard`; `produce` gives the prediction for a sample (read a
/// file, or generate it with a model). A sample whose prediction or files fail gets a row with
/// the error and no values; the others are still scored.
pub fn evaluate(
    dataset: &Path,
    samples: &[EvalSample],
    built: &BuiltMetrics,
    specs: &[MetricSpec],
    opts: &EvalOptions,
    produce: &mut dyn FnMut(&EvalSample) -> Result<RgbImage>,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<EvalResult> {
    let (i, n) = opts.shard;
    if n == 0 || i >= n {
        return Err(Error::invalid("shard", format!("{i}/{n}: need 0 <= i < n")));
    }
    if opts.size == Some(0) {
        return Err(Error::invalid("size", "0 px (must be at least 1)"));
    }
    let metrics = &built.metrics;
    let mine: Vec<&EvalSample> = samples.iter().filter(|s| s.index % n == i).collect();
    let mut rows = Vec::with_capacity(mine.len());
    let mut set_features = BTreeMap::new();
    for (k, s) in mine.iter().enumerate() {
        let mut values = BTreeMap::new();
        let mut features = BTreeMap::new();
        let outcome = produce(s).and_then(|pred| score_sample(s, pred, opts.size, metrics, &mut values, &mut features));
        let error = match outcome {
            Ok(()) => {
                for (k, v) in features {
                    set_features.entry(k).or_insert_with(Vec::new).extend(v);
                }
                None
            }
            Err(e) => {
                values.clear();
                Some(e.to_string())
            }
        };
        rows.push(Row { index: s.index, id: s.id.clone(), values, error, groups: s.groups.clone() });
        if let Some(p) = progress {
            p(k + 1, mine.len());
        }
    }
    let mut columns = Vec::new();
    for m in metrics {
        match m {
            Metric::Sample(m) => columns.extend(m.columns()),
            Metric::Set { column, .. } => columns.push(column.clone()),
        }
    }
    let mut r = EvalResult {
        name: opts.name.clone(),
        dataset: dataset.display().to_string(),
        pred_dir: None,
        size: opts.size,
        dataset_samples: samples.len(),
        shard: (n > 1).then_some((i, n)),
        columns,
        skipped: built.skipped.clone(),
        rows,
        ci: CI_METHOD.into(),
        aggregates: BTreeMap::new(),
        set_scores: BTreeMap::new(),
        set_features,
    };
    finalize(&mut r, specs)?;
    Ok(r)
}

/// Score predictions stored as `<pred_dir>/<sample id>.png`.
pub fn evaluate_dir(
    pred_dir: &Path,
    dataset: &Path,
    built: &BuiltMetrics,
    specs: &[MetricSpec],
    opts: &EvalOptions,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<EvalResult> {
    let samples = super::samples::list_samples(dataset)?;
    let mut produce = |s: &EvalSample| imageio::load_rgb(pred_dir.join(format!("{}.png", s.id)), None);
    let mut r = evaluate(dataset, &samples, built, specs, opts, &mut produce, progress)?;
    r.pred_dir = Some(pred_dir.display().to_string());
    Ok(r)
}

/// The panels shown for one sample in the best/worst grid: target, prediction (at the
/// target's size), mask, when present.
pub fn sample_panels(s: &EvalSample, pred_dir: &Path, size: Option<u32>) -> Result<Vec<RgbImage>> {
    let mut out = Vec::new();
    let target = s.target.as_ref().map(|p| imageio::load_rgb(p, size)).transpose()?;
    let pred = imageio::load_rgb(pred_dir.join(format!("{}.png", s.id)), None)?;
    let dims = target.as_ref().map(|t| t.dimensions()).unwrap_or(pred.dimensions());
    if let Some(t) = target {
        out.push(t);
    }
    out.push(if pred.dimensions() == dims { pred } else { imageio::resize_rgb(&pred, dims.0, dims.1) });
    if let Some(m) = &s.mask {
        out.push(imageio::mask_to_rgb(&resize_mask(imageio::load_mask(m, None)?, dims)));
    }
    Ok(out)
}

/// The panels of one sample on a contact sheet: its references, the target and the
/// prediction, all at the target's size.
pub fn sheet_panels(s: &EvalSample, pred_dir: &Path, size: Option<u32>) -> Result<Vec<RgbImage>> {
    let target = s.target.as_ref().map(|p| imageio::load_rgb(p, size)).transpose()?;
    let pred = imageio::load_rgb(pred_dir.join(format!("{}.png", s.id)), None)?;
    let (w, h) = target.as_ref().map(|t| t.dimensions()).unwrap_or(pred.dimensions());
    let mut out = Vec::new();
    for r in &s.refs {
        out.push(imageio::resize_rgb(&imageio::load_rgb(r, None)?, w, h));
    }
    out.extend(target);
    out.push(if pred.dimensions() == (w, h) { pred } else { imageio::resize_rgb(&pred, w, h) });
    Ok(out)
}

/// One group of samples (e.g. the 2-subject samples) and its per-column aggregates, with the
/// same interval as the whole run's ([`CI_METHOD`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSummary {
    /// The group's value ("2", "next to").
    pub value: String,
    /// Samples in the group that were scored (failed ones are left out).
    pub samples: usize,
    pub aggregates: BTreeMap<String, Summary>,
}

/// The run's scored rows grouped by `key` (`subjects` or `relation`), each group's columns
/// summarised; groups in order of their value (numbers by number). Rows without the key are
/// left out; an empty list when no row has it. Set metrics (FID) are not split: with a few
/// hundred samples per group their covariance would be meaningless.
pub fn group_summaries(r: &EvalResult, key: &str) -> Vec<GroupSummary> {
    let mut groups: BTreeMap<(u64, String), Vec<&Row>> = BTreeMap::new();
    for row in r.rows.iter().filter(|row| row.error.is_none()) {
        if let Some(v) = row.groups.get(key) {
            // Numbers sort by value, words after them alphabetically.
            let order = v.parse::<u64>().unwrap_or(u64::MAX);
            groups.entry((order, v.clone())).or_default().push(row);
        }
    }
    groups
        .into_iter()
        .map(|((_, value), rows)| {
            let aggregates = r
                .columns
                .iter()
                .filter_map(|c| {
                    let vals: Vec<f64> = rows.iter().filter_map(|row| row.values.get(&c.name).copied().flatten()).collect();
                    summarize(&vals).map(|s| (c.name.clone(), s))
                })
                .collect();
            GroupSummary { value, samples: rows.len(), aggregates }
        })
        .collect()
}

/// Recompute aggregates and set scores from the rows (sorted by dataset index).
fn finalize(r: &mut EvalResult, specs: &[MetricSpec]) -> Result<()> {
    r.rows.sort_by_key(|row| row.index);
    r.aggregates.clear();
    for c in &r.columns {
        let vals: Vec<f64> = r.rows.iter().filter_map(|row| row.values.get(&c.name).copied().flatten()).collect();
        if let Some(s) = summarize(&vals) {
            r.aggregates.insert(c.name.clone(), s);
        }
    }
    r.set_scores.clear();
    for (name, feats) in r.set_features.iter_mut() {
        feats.sort_by_key(|f| f.index);
        let score = set_score_fn(specs, name)
            .ok_or_else(|| Error::invalid("set metric", format!("`{name}` is not in the metric registry")))?;
        let pred: Vec<Vec<f64>> = feats.iter().map(|f| f.pred.clone()).collect();
        let target: Vec<Vec<f64>> = feats.iter().filter_map(|f| f.target.clone()).collect();
        r.set_scores.insert(name.clone(), score(&pred, &target)?);
    }
    Ok(())
}

/// Merge shard results of one run into one result (equal to the unsharded run when the shards
/// cover the dataset). Runs of other datasets or other metric columns are refused.
pub fn merge(parts: &[EvalResult], specs: &[MetricSpec]) -> Result<EvalResult> {
    let first = parts.first().ok_or_else(|| Error::invalid("merge", "no results given"))?;
    let mut out = first.clone();
    out.rows.clear();
    out.set_features.clear();
    let mut seen = std::collections::BTreeSet::new();
    for p in parts {
        if p.dataset != first.dataset || p.columns != first.columns || p.dataset_samples != first.dataset_samples {
            return Err(Error::invalid(
                "merge",
                format!("`{}` on {} has other columns or another dataset than `{}` on {}", p.name, p.dataset, first.name, first.dataset),
            ));
        }
        for row in &p.rows {
            if !seen.insert(row.index) {
                return Err(Error::invalid("merge", format!("sample {} (index {}) appears in two shards", row.id, row.index)));
            }
            out.rows.push(row.clone());
        }
        for (k, v) in &p.set_features {
            out.set_features.entry(k.clone()).or_default().extend(v.iter().cloned());
        }
        for s in &p.skipped {
            if !out.skipped.contains(s) {
                out.skipped.push(s.clone());
            }
        }
    }
    out.shard = if out.rows.len() == out.dataset_samples { None } else { first.shard };
    finalize(&mut out, specs)?;
    Ok(out)
}

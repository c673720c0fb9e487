//! What a metric is. Every metric, built-in or network-based, is one [`MetricSpec`] line in
//! the registry ([`super::registry::builtin_metrics`]): a name, what it needs, and a
//! constructor that may fail (e.g. a missing weight file). [`build_metrics`] turns the selected specs into metrics; a constructor that
//! fails skips that metric with its message while the others run.
//!
//! Two kinds: per-sample metrics (one value per sample and column, aggregated with t intervals)
//! and set metrics (FID-like: a feature vector per prediction and target, one score for the
//! whole set computed by a pure function, so shards can be merged exactly).

use super::identity::Subject;
use super::pixel::{self, Planar};
use super::samples::EvalSample;
use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One output column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// Shown in tables (e.g. "PSNR").
    pub label: String,
    pub higher_is_better: bool,
}

impl Column {
    pub fn new(name: &str, label: &str, higher_is_better: bool) -> Self {
        Column { name: name.into(), label: label.into(), higher_is_better }
    }
}

/// Everything known about one sample when it is scored. Images are at the evaluation size:
/// the prediction is resized to the target's size when they differ.
pub struct SampleData<'a> {
    pub sample: &'a EvalSample,
    pub pred: &'a RgbImage,
    pub target: Option<&'a RgbImage>,
    pub mask: Option<&'a GrayImage>,
    pub refs: &'a [RgbImage],
    pub subjects: &'a [Subject],
    /// Planar copies and the SSIM map, computed once per sample for all pixel metrics.
    pixel_cache: std::cell::OnceCell<(Planar, Planar, Vec<f64>)>,
}

impl<'a> SampleData<'a> {
    pub fn new(
        sample: &'a EvalSample,
        pred: &'a RgbImage,
        target: Option<&'a RgbImage>,
        mask: Option<&'a GrayImage>,
        refs: &'a [RgbImage],
        subjects: &'a [Subject],
    ) -> Self {
        SampleData { sample, pred, target, mask, refs, subjects, pixel_cache: std::cell::OnceCell::new() }
    }

    /// Prediction and target as planar [0, 1] images and their SSIM map (`None` without a
    /// target), computed on first use.
    pub fn planar_and_ssim(&self) -> Result<Option<&(Planar, Planar, Vec<f64>)>> {
        let Some(target) = self.target else { return Ok(None) };
        if self.pixel_cache.get().is_none() {
            let (p, t) = (Planar::from_rgb(self.pred), Planar::from_rgb(target));
            let map = pixel::ssim_map(&p, &t)?;
            let _ = self.pixel_cache.set((p, t, map));
        }
        Ok(self.pixel_cache.get())
    }
}

/// A metric with one value per sample for each of its columns (`None` = not applicable).
pub trait SampleMetric {
    fn columns(&self) -> Vec<Column>;
    /// Values aligned with `columns()`.
    fn score(&self, d: &SampleData) -> Result<Vec<Option<f64>>>;
}

/// Features of one sample for a set metric.
pub struct SetFeatures {
    pub pred: Vec<f64>,
    pub target: Option<Vec<f64>>,
}

/// The feature extractor of a set metric (the score itself is [`SetScoreFn`]).
pub trait SetMetric {
    fn features(&self, d: &SampleData) -> Result<SetFeatures>;
}

/// Set score from the prediction and target features of all samples (no weights needed, so
/// merged shards can be scored without loading the network).
pub type SetScoreFn = fn(pred: &[Vec<f64>], target: &[Vec<f64>]) -> Result<f64>;

/// What a constructor may use: where weight files are, and the device.
pub struct MetricContext {
    /// Folder with weight files (each network metric documents the file name it expects).
    pub weights_dir: Option<PathBuf>,
    pub device: candle_core::Device,
}

pub enum MetricKind {
    Sample(fn(&MetricContext) -> Result<Box<dyn SampleMetric>>),
    Set { column: fn() -> Column, build: fn(&MetricContext) -> Result<Box<dyn SetMetric>>, score: SetScoreFn },
}

/// One registry line.
pub struct MetricSpec {
    pub name: &'static str,
    pub about: &'static str,
    pub kind: MetricKind,
}

/// A built metric.
pub enum Metric {
    Sample(Box<dyn SampleMetric>),
    Set { column: Column, extractor: Box<dyn SetMetric>, score: SetScoreFn },
}

/// A metric that could not be built, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub metric: String,
    pub reason: String,
}

/// The metrics that were built, and those skipped with the reason.
pub struct BuiltMetrics {
    pub metrics: Vec<Metric>,
    pub skipped: Vec<Skipped>,
}

/// Build the metrics named in `select` (all when `None`), in registry order. An unknown name is
/// an error; a constructor that fails is reported in `skipped` and left out.
pub fn build_metrics(specs: &[MetricSpec], select: Option<&[String]>, ctx: &MetricContext) -> Result<BuiltMetrics> {
    if let Some(sel) = select {
        for s in sel {
            if !specs.iter().any(|m| m.name == s) {
                let known: Vec<_> = specs.iter().map(|m| m.name).collect();
                return Err(Error::invalid("metric", format!("unknown metric `{s}` (known: {})", known.join(", "))));
            }
        }
    }
    let mut metrics = Vec::new();
    let mut skipped = Vec::new();
    for spec in specs.iter().filter(|m| select.is_none_or(|sel| sel.iter().any(|s| s == m.name))) {
        let built = match &spec.kind {
            MetricKind::Sample(build) => build(ctx).map(Metric::Sample),
            MetricKind::Set { column, build, score } => {
                build(ctx).map(|extractor| Metric::Set { column: column(), extractor, score: *score })
            }
        };
        match built {
            Ok(m) => metrics.push(m),
            Err(e) => skipped.push(Skipped { metric: spec.name.to_string(), reason: e.to_string() }),
        }
    }
    Ok(BuiltMetrics { metrics, skipped })
}

/// The score function of the set metric producing `column`, looked up in the registry.
pub fn set_score_fn(specs: &[MetricSpec], column: &str) -> Option<SetScoreFn> {
    specs.iter().find_map(|s| match &s.kind {
        MetricKind::Set { column: c, score, .. } if c().name == column => Some(*score),
        _ => None,
    })
}

//! Evaluation: pixel metrics (PSNR, MSE, SSIM, masked variants), Canny-edge F1, identity
//! accuracy and swap rate, the metric registry, sharded runs and reports.
//!
//! `registry` lists every metric (including the network metrics; `metric` says what one is);
//! `run` scores a dataset (from prediction files or from a closure that generates them);
//! `report` writes JSON, markdown tables and best/worst grids.
//!
//! Adding a metric (e.g. a network metric from `nets`) is one line in
//! [`registry::builtin_metrics`]: a per-sample metric implements [`metric::SampleMetric`] and
//! is built by `MetricKind::Sample(|ctx| Ok(Box::new(Lpips::load(ctx)?)))`; a set metric
//! (FID) gives a feature extractor ([`metric::SetMetric`]) and a pure score function. A
//! constructor that returns an error (missing weight file) skips that metric with the error's
//! message while the others run. Generating predictions with a model plugs into
//! [`run::evaluate`] as the `produce` closure.

pub mod edges;
pub mod identity;
pub mod metric;
pub mod net_metrics;
pub mod nets;
pub mod pixel;
pub mod registry;
pub mod report;
pub mod run;
pub mod samples;
pub mod stats;
#[cfg(test)]
mod tests;

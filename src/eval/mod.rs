//! Evaluation: pixel metrics (PSNR, MSE, SSIM, masked variants), Canny-edge F1, identity
//! accuracy and swap rate, the metric registry, sharded runs and reports.
//!
//! `metric` holds the registry every metric (including the network metrics) is listed in;
//! `run` scores a dataset (from prediction files or from a closure that generates them);
//! `report` writes JSON, markdown tables and best/worst grids.

pub mod edges;
pub mod identity;
pub mod metric;
pub mod pixel;
pub mod report;
pub mod run;
pub mod stats;
pub mod samples;
#[cfg(test)]
mod tests;




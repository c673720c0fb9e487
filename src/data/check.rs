//! Dataset validation: every sample is opened and every image decoded; all bad samples are
//! reported with their reason, none stops the check.

use super::format::{Dataset, OpenOptions};
use crate::error::Result;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    /// Samples found (good + bad).
    pub total: usize,
    pub good: usize,
    /// (sample id, reason), in dataset order.
    pub bad: Vec<(String, String)>,
    /// The folder every file of the dataset must lie in (a manifest's declared root).
    pub root: std::path::PathBuf,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.bad.is_empty()
    }
}

/// Validate a dataset folder or `.jsonl` manifest: missing files, unreadable, truncated or
/// zero-size images, more references than `opts.max_refs`, empty prompts, a mask whose size
/// differs from the background's. Images are always decoded, whatever `opts.decode` says.
pub fn check(path: &Path, opts: &OpenOptions) -> Result<CheckReport> {
    let opts = OpenOptions { decode: true, ..opts.clone() };
    let ds = Dataset::open_quiet(path, &opts)?;
    Ok(CheckReport {
        total: ds.samples.len() + ds.skipped.len(),
        good: ds.samples.len(),
        bad: ds.skipped,
        root: ds.root,
    })
}

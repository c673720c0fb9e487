//! Datasets: the InstructAR on-disk format (and a JSONL manifest alternative), validation, the
//! procedural synthetic benchmark, and the code cache training reads.

pub mod batch;
pub mod cache;
pub mod check;
pub mod format;
pub mod instructar;
pub mod manifest;
pub mod provenance;
pub mod sheet;
pub mod subjects200k;
pub mod synth;

pub use format::{Dataset, LoadedSample, Meta, OpenOptions, Sample, SubjectMeta};
pub use check::{check, CheckReport};

use crate::error::{Error, Result};
use std::path::Path;

// Opening dispatches on the layout, so it lives here, above both layouts (`format` defines
// the in-memory form and knows neither).
impl Dataset {
    /// Open an InstructAR folder tree or a `.jsonl` manifest. Bad samples are skipped with a
    /// warning on stderr and listed in `skipped`; only an unreadable root is an error.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        let ds = Self::open_quiet(path, opts)?;
        if !ds.skipped.is_empty() {
            eprintln!(
                "warning: {}: skipped {} bad sample(s) of {} (first: {}: {}); run `tokenar data check` for all reasons",
                path.display(),
                ds.skipped.len(),
                ds.skipped.len() + ds.samples.len(),
                ds.skipped[0].0,
                ds.skipped[0].1
            );
        }
        Ok(ds)
    }

    /// As [`Dataset::open`] without the warning.
    pub fn open_quiet(path: &Path, opts: &OpenOptions) -> Result<Self> {
        if path.is_dir() {
            instructar::open_dir(path, opts)
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            manifest::open_manifest(path, opts)
        } else if path.exists() {
            Err(Error::bad_file(path, "not a dataset folder or a .jsonl manifest"))
        } else {
            Err(Error::bad_file(path, "dataset not found"))
        }
    }
}

#[cfg(test)]
mod tests;

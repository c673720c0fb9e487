//! The per-sample report of a filter: one JSON object per line, appended and flushed as each
//! sample is decided, so an interrupted run loses at most the sample in flight and a rerun
//! skips every sample already in the file. The kept samples are written from it as a manifest.

use crate::data::manifest::write_manifest;
use crate::data::Sample;
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The decision on one sample (one report line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub id: String,
    /// The sample's folder, or its target image for a manifest entry.
    pub path: String,
    pub kept: bool,
    /// The filter and its setting (`identity min>20`, `vlm model=NAME`); a rerun into the
    /// same report must use the same one.
    pub filter: String,
    /// Identity filter: 100 x cosine between the target and each reference, in reference order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<f64>>,
    /// VLM filter: the model's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Why the sample was kept or dropped.
    pub reason: String,
    /// The sample was dropped because something failed (unreadable image, HTTP error, ...)
    /// rather than on its content; `--retry-errors` decides such samples again.
    #[serde(default)]
    pub error: bool,
}

impl Verdict {
    pub fn new(sample: &Sample, filter: &str, kept: bool, reason: impl Into<String>) -> Self {
        Self {
            id: sample.id.clone(),
            path: sample_path(sample).display().to_string(),
            kept,
            filter: filter.to_string(),
            scores: None,
            reply: None,
            reason: reason.into(),
            error: false,
        }
    }

    /// A drop because something failed.
    pub fn failed(sample: &Sample, filter: &str, reason: impl Into<String>) -> Self {
        Self { error: true, ..Self::new(sample, filter, false, reason) }
    }
}

/// What a report line names a sample by: its folder, else its target, else its background.
pub fn sample_path(sample: &Sample) -> &Path {
    sample.dir.as_deref().or(sample.target.as_deref()).unwrap_or(&sample.background)
}

/// Counts of one filter run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Samples in the dataset.
    pub total: usize,
    /// Decided by this run.
    pub decided: usize,
    /// Already in the report, skipped.
    pub resumed: usize,
    /// Kept / dropped over the whole report (this run and earlier ones).
    pub kept: usize,
    pub dropped: usize,
    /// Drops because something failed (over the whole report).
    pub errors: usize,
    /// Drops because something failed in this run, and the first of them (id, reason).
    pub errors_now: usize,
    pub first_error: Option<(String, String)>,
}

/// An append-only report file and the verdicts already in it (the last line of a sample wins).
pub struct Report {
    path: PathBuf,
    file: std::fs::File,
    done: HashMap<String, Verdict>,
    errors_now: usize,
    first_error: Option<(String, String)>,
}

impl Report {
    /// Open (or create) `path`. A line cut short by an interrupted run is removed; any other
    /// unreadable line, or a line written by another filter setting than `filter`, is an error.
    pub fn open(path: &Path, filter: &str) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_path(parent)?;
        }
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8(b).map_err(|_| Error::bad_file(path, "report is not UTF-8 text"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        // Everything after the last newline is a line whose write was cut short.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let mut done = HashMap::new();
        for (n, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Verdict = serde_json::from_str(line)
                .map_err(|e| Error::bad_file(path, format!("line {}: not a report line: {e}", n + 1)))?;
            if v.filter != filter {
                return Err(Error::bad_file(
                    path,
                    format!("line {}: written by `{}`, but this run is `{filter}`; use another output folder", n + 1, v.filter),
                ));
            }
            done.insert(v.id.clone(), v);
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).with_path(path)?;
        if complete < text.len() {
            file.set_len(complete as u64).with_path(path)?;
        }
        Ok(Self { path: path.to_path_buf(), file, done, errors_now: 0, first_error: None })
    }

    /// The verdict already recorded for a sample.
    pub fn get(&self, id: &str) -> Option<&Verdict> {
        self.done.get(id)
    }

    /// Whether a sample still has to be decided: it is not in the report, or (with
    /// `retry_errors`) it was dropped because something failed.
    pub fn pending(&self, id: &str, retry_errors: bool) -> bool {
        self.get(id).is_none_or(|v| retry_errors && v.error)
    }

    /// Append one verdict and flush it to disk.
    pub fn record(&mut self, v: Verdict) -> Result<()> {
        if v.error {
            self.errors_now += 1;
            self.first_error.get_or_insert_with(|| (v.id.clone(), v.reason.clone()));
        }
        let mut line = serde_json::to_string(&v).map_err(|e| Error::invalid("report line", e.to_string()))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).with_path(&self.path)?;
        self.file.flush().with_path(&self.path)?;
        self.file.sync_data().with_path(&self.path)?;
        self.done.insert(v.id.clone(), v);
        Ok(())
    }

    /// Counts over the samples of `samples` that are in the report (`decided` and `resumed`
    /// are the caller's).
    pub fn summary(&self, samples: &[Sample]) -> Summary {
        let mut s = Summary {
            total: samples.len(),
            errors_now: self.errors_now,
            first_error: self.first_error.clone(),
            ..Summary::default()
        };
        for v in samples.iter().filter_map(|x| self.get(&x.id)) {
            if v.kept {
                s.kept += 1;
            } else {
                s.dropped += 1;
            }
            s.errors += v.error as usize;
        }
        s
    }

    /// Write the kept samples of `samples`, in their order, as a manifest at `path`
    /// (atomically), with absolute paths so that it can live anywhere, declaring the dataset's
    /// `root` (the folder its files live in) as the manifest's root.
    pub fn write_kept(&self, samples: &[Sample], root: &Path, path: &Path) -> Result<usize> {
        let kept: Vec<Sample> = samples
            .iter()
            .filter(|s| self.get(&s.id).is_some_and(|v| v.kept))
            .map(absolute_sample)
            .collect::<Result<_>>()?;
        write_manifest(path, Some(&absolute(root)?), &kept)?;
        Ok(kept.len())
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    match std::fs::canonicalize(p) {
        Ok(a) => Ok(a),
        Err(_) => Ok(std::env::current_dir().map_err(|e| Error::io(".", e))?.join(p)),
    }
}

/// The sample with every path absolute (a manifest resolves relative paths against its own
/// folder, not the working directory the dataset was opened from).
fn absolute_sample(s: &Sample) -> Result<Sample> {
    Ok(Sample {
        id: s.id.clone(),
        dir: s.dir.as_deref().map(absolute).transpose()?,
        refs: s.refs.iter().map(|p| absolute(p)).collect::<Result<_>>()?,
        background: absolute(&s.background)?,
        target: s.target.as_deref().map(absolute).transpose()?,
        mask: s.mask.as_deref().map(absolute).transpose()?,
        prompt: s.prompt.clone(),
        meta: s.meta.clone(),
    })
}

//! A JSONL manifest for datasets that do not live in one folder tree: one JSON object per line,
//! `{"id", "refs": [..], "background", "target", "mask", "prompt", "meta"}`, with paths relative
//! to the manifest's folder (or absolute). Blank lines and lines starting with `#` are ignored.
//! A manifest is an explicit list of files (curation writes one naming another folder's
//! images), so its paths are not confined to its folder; the folder layout's are (see
//! `instructar::open_dir`).

use super::format::{validate, Dataset, Meta, OpenOptions, Sample};
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default)]
    pub id: Option<String>,
    pub refs: Vec<PathBuf>,
    pub background: PathBuf,
    #[serde(default)]
    pub target: Option<PathBuf>,
    #[serde(default)]
    pub mask: Option<PathBuf>,
    pub prompt: String,
    #[serde(default)]
    pub meta: Option<Meta>,
}

pub fn open_manifest(path: &Path, opts: &OpenOptions) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).with_path(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let mut ds = Dataset {
        root: base.clone(),
        samples: Vec::new(),
        skipped: Vec::new(),
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fallback = format!("line_{}", n + 1);
        let entry: Entry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(e) => {
                ds.skipped.push((fallback, format!("{} line {}: invalid entry: {e}", path.display(), n + 1)));
                continue;
            }
        };
        let sample = Sample {
            id: entry.id.unwrap_or(fallback),
            dir: None,
            refs: entry.refs.into_iter().map(abs).collect(),
            background: abs(entry.background),
            target: entry.target.map(abs),
            mask: entry.mask.map(abs),
            prompt: entry.prompt.trim().to_string(),
            meta: entry.meta,
        };
        match validate(&sample, opts) {
            Ok(()) => ds.samples.push(sample),
            Err(reason) => ds.skipped.push((sample.id, reason)),
        }
    }
    Ok(ds)
}

/// Write a manifest for `samples` (paths as stored), one line each, atomically.
pub fn write_manifest(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::new();
    for s in samples {
        let e = Entry {
            id: Some(s.id.clone()),
            refs: s.refs.clone(),
            background: s.background.clone(),
            target: s.target.clone(),
            mask: s.mask.clone(),
            prompt: s.prompt.clone(),
            meta: s.meta.clone(),
        };
        out.push_str(&serde_json::to_string(&e).map_err(|e| Error::invalid("manifest entry", e.to_string()))?);
        out.push('\n');
    }
    crate::util::atomic_write(path, out.as_bytes())
}

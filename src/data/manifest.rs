//! A JSONL manifest for datasets that do not live in one folder tree: one JSON object per line,
//! `{"id", "refs": [..], "background", "target", "mask", "prompt", "meta"}`, with paths relative
//! to the manifest's folder (or absolute). Blank lines and lines starting with `#` are ignored.
//!
//! Every path a manifest names must lie inside its root (symbolic links and `..` resolved, as
//! for the folder layout, see `instructar::open_dir`): by default the manifest's own folder. A
//! manifest that lists another folder's images (curation writes one) declares that folder on a
//! header line `#root <path>` (absolute, or relative to the manifest's folder); a sample naming a
//! file outside the root is skipped with a reason naming the path. The declared root is shown by
//! `tokenar data check`, so what a manifest can reach is one line to read.

use super::format::{canonical_root, confine_sample, validate, Dataset, Meta, OpenOptions, Sample};
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

/// The header line that declares a manifest's root.
pub const ROOT_HEADER: &str = "#root ";

/// The root a manifest's text declares (`#root <path>` before the first entry), resolved against
/// the manifest's folder `base`; `base` itself when none is declared.
fn declared_root(path: &Path, text: &str, base: &Path) -> Result<PathBuf> {
    for line in text.lines().map(str::trim) {
        if let Some(root) = line.strip_prefix(ROOT_HEADER) {
            let root = Path::new(root.trim());
            if root.as_os_str().is_empty() {
                return Err(Error::bad_file(path, "`#root` names no folder"));
            }
            let full = if root.is_absolute() { root.to_path_buf() } else { base.join(root) };
            return canonical_root(&full).map_err(|e| Error::bad_file(path, format!("declared root {}: {e}", root.display())));
        }
        if !line.is_empty() && !line.starts_with('#') {
            break;
        }
    }
    canonical_root(base)
}

pub fn open_manifest(path: &Path, opts: &OpenOptions) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).with_path(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let root = declared_root(path, &text, &base)?;
    let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let mut ds = Dataset {
        root: root.clone(),
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
        match confine_sample(&root, &sample).and_then(|()| validate(&sample, opts)) {
            Ok(()) => ds.samples.push(sample),
            Err(reason) => ds.skipped.push((sample.id, reason)),
        }
    }
    Ok(ds)
}

/// Write a manifest for `samples` (paths as stored), one line each, atomically; `root`, when
/// given, is declared on the header line (the folder the samples' files live in).
pub fn write_manifest(path: &Path, root: Option<&Path>, samples: &[Sample]) -> Result<()> {
    let mut out = String::new();
    if let Some(root) = root {
        let root = root.to_str().ok_or_else(|| Error::invalid("manifest root", format!("{} is not valid UTF-8", root.display())))?;
        out.push_str(ROOT_HEADER);
        out.push_str(root);
        out.push('\n');
    }
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

//! The in-memory form of a multi-subject sample, shared by both on-disk layouts (the
//! InstructAR folder tree in `instructar.rs`, the JSONL manifest in `manifest.rs`).

use crate::error::{Error, IoContext, Result};
use crate::imageio;
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The default maximum number of reference images per sample (TokenAR: 3 references plus one
/// background slot).
pub const DEFAULT_MAX_REFS: usize = 3;

/// Optional per-sample annotation (`meta.json`): what identity metrics and reports read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Meta {
    /// Relation name, e.g. "left_of"; empty for a single subject.
    #[serde(default)]
    pub relation: String,
    /// With three or more subjects: the relation of subject i to subject i + 1, in order
    /// (`relation` is the first of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relations: Vec<String>,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub subjects: Vec<SubjectMeta>,
}

/// One subject of a sample: its identity and where it is in the target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SubjectMeta {
    /// Shape category named in the prompt ("star", "ring", ...).
    pub category: String,
    /// Body colour name and pattern colour name (equal for solid subjects).
    #[serde(default)]
    pub colors: Vec<String>,
    /// Surface pattern ("solid", "stripes", "dots", "checker").
    #[serde(default)]
    pub pattern: String,
    /// Stable identity id (category x colours x pattern); equal ids mean the same subject.
    #[serde(default)]
    pub identity: Option<u32>,
    /// Visible extent in target pixels, x0, y0 inclusive, x1, y1 exclusive.
    #[serde(rename = "box", default)]
    pub bbox: Option<[u32; 4]>,
    /// The subject's own visible mask, relative to the sample folder.
    #[serde(default)]
    pub mask: Option<String>,
    /// Its reference image, relative to the sample folder.
    #[serde(default)]
    pub reference: Option<String>,
}

/// One sample: file paths plus the prompt. Nothing is decoded until [`Sample::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    /// The sample's folder (InstructAR layout); `None` for manifest entries.
    pub dir: Option<PathBuf>,
    pub refs: Vec<PathBuf>,
    pub background: PathBuf,
    pub target: Option<PathBuf>,
    pub mask: Option<PathBuf>,
    pub prompt: String,
    pub meta: Option<Meta>,
}

/// The decoded images of one sample, all `size` x `size`.
#[derive(Debug, Clone)]
pub struct LoadedSample {
    pub refs: Vec<RgbImage>,
    pub background: RgbImage,
    pub target: Option<RgbImage>,
    pub mask: Option<GrayImage>,
    /// Each subject's own mask, in reference order (see [`Sample::subject_masks`]).
    pub subject_masks: Option<Vec<GrayImage>>,
    pub prompt: String,
}

impl Sample {
    /// Decode all images (RGBA composited onto white) and resize them to `size` x `size`.
    /// The mask is resized with nearest neighbour and binarised.
    pub fn load(&self, size: u32) -> Result<LoadedSample> {
        if size == 0 {
            return Err(Error::invalid("image size", "must be at least 1 pixel"));
        }
        let refs = self
            .refs
            .iter()
            .map(|p| imageio::load_rgb(p, Some(size)))
            .collect::<Result<Vec<_>>>()?;
        Ok(LoadedSample {
            refs,
            background: imageio::load_rgb(&self.background, Some(size))?,
            target: self.target.as_ref().map(|p| imageio::load_rgb(p, Some(size))).transpose()?,
            mask: self.mask.as_ref().map(|p| imageio::load_mask(p, Some(size))).transpose()?,
            subject_masks: self.subject_masks(Some(size))?,
            prompt: self.prompt.clone(),
        })
    }

    /// Each subject's own visible mask (`meta.json` `subjects[i].mask`, relative to the sample
    /// folder), in reference order, binarised and resized with nearest neighbour. `None` when
    /// the sample has no folder or no meta, or when not every reference has a subject mask.
    pub fn subject_masks(&self, size: Option<u32>) -> Result<Option<Vec<GrayImage>>> {
        let (Some(dir), Some(meta)) = (&self.dir, &self.meta) else {
            return Ok(None);
        };
        if meta.subjects.len() != self.refs.len() || meta.subjects.iter().any(|s| s.mask.is_none()) {
            return Ok(None);
        }
        meta.subjects
            .iter()
            .filter_map(|s| s.mask.as_ref())
            .map(|m| imageio::load_mask(dir.join(m), size))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// How a dataset is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Samples with more references are bad ("more references than the configured maximum").
    pub max_refs: usize,
    /// Samples without a target (`real.png`) are bad unless this is set (inference sets).
    pub allow_missing_target: bool,
    /// Decode every image while opening, so unreadable or truncated files are caught up front
    /// (what `check` does); otherwise only file presence and the prompt are checked.
    pub decode: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            max_refs: DEFAULT_MAX_REFS,
            allow_missing_target: false,
            decode: false,
        }
    }
}

/// A dataset: the good samples in order, and the bad ones with the reason they were skipped.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub samples: Vec<Sample>,
    /// (sample id, reason) for every sample that was skipped.
    pub skipped: Vec<(String, String)>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Check one sample's files; `Err(reason)` names what is wrong. Shared by both layouts.
pub(crate) fn validate(sample: &Sample, opts: &OpenOptions) -> std::result::Result<(), String> {
    if sample.prompt.trim().is_empty() {
        return Err("empty prompt".to_string());
    }
    if sample.refs.is_empty() {
        return Err("no reference images".to_string());
    }
    if sample.refs.len() > opts.max_refs {
        return Err(format!(
            "{} references, more than the configured maximum of {}",
            sample.refs.len(),
            opts.max_refs
        ));
    }
    if sample.target.is_none() && !opts.allow_missing_target {
        return Err("missing target image (real.png)".to_string());
    }
    let mut files: Vec<&Path> = sample.refs.iter().map(|p| p.as_path()).collect();
    files.push(&sample.background);
    files.extend(sample.target.as_deref());
    for f in &files {
        if !f.is_file() {
            return Err(format!("missing file {}", f.display()));
        }
    }
    if let Some(m) = &sample.mask {
        if !m.is_file() {
            return Err(format!("missing file {}", m.display()));
        }
    }
    if !opts.decode {
        return Ok(());
    }
    let mut bg_size = None;
    for f in &files {
        let img = imageio::open(f).map_err(|e| unreadable(&e))?;
        if *f == sample.background.as_path() {
            bg_size = Some((img.width(), img.height()));
        }
    }
    if let Some(m) = &sample.mask {
        let img = imageio::open(m).map_err(|e| unreadable(&e))?;
        let ms = (img.width(), img.height());
        if let Some(bs) = bg_size {
            if ms != bs {
                return Err(format!(
                    "mask size mismatch: {} is {}x{} but the background is {}x{}",
                    m.display(),
                    ms.0,
                    ms.1,
                    bs.0,
                    bs.1
                ));
            }
        }
    }
    Ok(())
}

/// `path` (absolute, or relative to the working folder, as it would be opened) resolved
/// (symbolic links followed, `..` applied) when it lies inside the dataset root `root`
/// (already canonical), otherwise the reason. A path that does not exist is resolved as
/// far as its existing ancestors go, so a missing file under a symlinked folder that leaves the
/// root is refused too.
pub fn confine(root: &Path, path: &Path) -> std::result::Result<PathBuf, String> {
    // Callers pass paths as they open them: a relative one is relative to the working folder.
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| format!("{}: {e}", path.display()))?.join(path)
    };
    // The longest existing ancestor, canonicalised, then the remaining components lexically.
    let mut existing = full.as_path();
    let mut rest = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(c) => break c,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent;
                }
                _ => return Err(format!("{} cannot be resolved", path.display())),
            },
        }
    };
    let mut out = resolved;
    for part in rest.iter().rev() {
        match part.to_str() {
            Some("..") => {
                out.pop();
            }
            Some(".") => {}
            _ => out.push(part),
        }
    }
    if out.starts_with(root) {
        Ok(out)
    } else {
        Err(format!("{} resolves to {}, outside the dataset root {}", path.display(), out.display(), root.display()))
    }
}

/// The canonical form of a dataset root (the folder every sample path must stay inside).
pub fn canonical_root(root: &Path) -> Result<PathBuf> {
    let r = if root.as_os_str().is_empty() { Path::new(".") } else { root };
    r.canonicalize().with_path(r)
}

/// Check that every file a sample names lies inside `root` (canonical): its references,
/// background, target, mask, its folder and, from `meta.json`, each subject's mask and
/// reference.
pub(crate) fn confine_sample(root: &Path, s: &Sample) -> std::result::Result<(), String> {
    let mut paths: Vec<PathBuf> = s.refs.iter().cloned().collect();
    paths.push(s.background.clone());
    paths.extend(s.target.iter().cloned());
    paths.extend(s.mask.iter().cloned());
    if let Some(dir) = &s.dir {
        paths.push(dir.clone());
        for m in s.meta.iter().flat_map(|m| &m.subjects) {
            for rel in m.mask.iter().chain(m.reference.iter()) {
                paths.push(dir.join(rel));
            }
        }
    }
    for p in &paths {
        confine(root, p)?;
    }
    Ok(())
}

fn unreadable(e: &Error) -> String {
    format!("unreadable image: {e}")
}

/// Read a UTF-8 text file, trimmed.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_path(path)?;
    let s = String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "not UTF-8 text"))?;
    Ok(s.trim().to_string())
}

//! The few dataset files evaluation needs, read directly (sample folders named
//! `<name>_<int>`, ordered by the integer): `real.png` (target), `mask.png`, `ref/*`, and
//! `meta.json` with per-subject masks and references. Kept small and private to `eval`
//! so that it can later be replaced by `crate::data`.

use crate::error::{Error, IoContext, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One sample to evaluate, as plain paths.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalSample {
    /// Position in the dataset's order (shards and merges keep it).
    pub index: usize,
    /// The folder name; predictions are `<id>.png`.
    pub id: String,
    pub target: Option<PathBuf>,
    pub mask: Option<PathBuf>,
    pub refs: Vec<PathBuf>,
    /// Per-subject (mask, reference) from `meta.json`, empty without one.
    pub subjects: Vec<(PathBuf, PathBuf)>,
    /// What the sample is grouped by in the per-group tables: `subjects` (the number of
    /// references) and, where `meta.json` names one, `relation` (its first relation).
    pub groups: BTreeMap<String, String>,
}

fn sample_number(name: &str) -> Option<u64> {
    name.rsplit_once('_').and_then(|(_, n)| n.parse().ok())
}

fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_path(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
                Some("png" | "webp" | "jpg" | "jpeg"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The string value of the first key present among `keys`.
fn str_field<'a>(v: &'a serde_json::Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_str()))
}

/// Per-subject (mask, reference) paths from `meta.json`: `subjects[i].mask` (or `mask_<i>.png`)
/// and `subjects[i].reference` / `ref` (or the i-th file of `ref/`); and its `relation`, when
/// it names one.
fn read_subjects(dir: &Path, refs: &[PathBuf]) -> Result<(Vec<(PathBuf, PathBuf)>, Option<String>)> {
    let path = dir.join("meta.json");
    if !path.exists() {
        return Ok((Vec::new(), None));
    }
    let bytes = std::fs::read(&path).with_path(&path)?;
    let meta: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(&path, format!("not valid JSON: {e}")))?;
    let relation = meta.get("relation").and_then(|r| r.as_str()).filter(|r| !r.is_empty()).map(str::to_string);
    let Some(list) = meta.get("subjects").and_then(|s| s.as_array()) else {
        return Ok((Vec::new(), relation));
    };
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let mask = match str_field(s, &["mask", "mask_file"]) {
            Some(m) => dir.join(m),
            None => dir.join(format!("mask_{i}.png")),
        };
        let reference = match str_field(s, &["reference", "ref", "ref_file", "reference_file"]) {
            Some(r) => dir.join(r),
            None => refs.get(i).cloned().ok_or_else(|| {
                Error::bad_file(&path, format!("subject {i} names no reference and ref/ has only {} files", refs.len()))
            })?,
        };
        out.push((mask, reference));
    }
    Ok((out, relation))
}

/// All sample folders under `root`, in the order of the integer after their last `_`.
pub fn list_samples(root: &Path) -> Result<Vec<EvalSample>> {
    let mut dirs: Vec<(u64, String, PathBuf)> = std::fs::read_dir(root)
        .with_path(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            Some((sample_number(&name)?, name, p))
        })
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(Error::bad_file(root, "no sample folders (named like `sample_<int>`) found"));
    }
    // Every file a sample names (symbolic links followed) must lie inside the dataset root.
    let canon = crate::data::format::canonical_root(root)?;
    let inside = |id: &str, p: &Path| {
        crate::data::format::confine(&canon, p).map(|_| ()).map_err(|why| Error::bad_file(root, format!("sample {id}: {why}")))
    };
    dirs.into_iter()
        .enumerate()
        .map(|(index, (_, id, dir))| {
            inside(&id, &dir)?;
            let opt = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
            let ref_dir = dir.join("ref");
            inside(&id, &ref_dir)?;
            let meta = dir.join("meta.json");
            inside(&id, &meta)?;
            let refs = if ref_dir.is_dir() { image_files(&ref_dir)? } else { Vec::new() };
            let (subjects, relation) = read_subjects(&dir, &refs)?;
            let mut groups = BTreeMap::from([("subjects".to_string(), refs.len().to_string())]);
            if let Some(r) = relation {
                groups.insert("relation".into(), r);
            }
            let s = EvalSample { index, id, target: opt("real.png"), mask: opt("mask.png"), refs, subjects, groups };
            for p in s.target.iter().chain(&s.mask).chain(&s.refs).chain(s.subjects.iter().flat_map(|(m, r)| [m, r])) {
                inside(&s.id, p)?;
            }
            Ok(s)
        })
        .collect()
}

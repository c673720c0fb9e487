//! The InstructAR folder layout, as the reference code writes it: one folder per sample named
//! `..._<int>` and ordered by that int, holding `ref/*.png|webp`, `background.png`, `real.png`
//! (the target) and `description.txt` (the prompt); this project adds an optional `mask.png`
//! and `meta.json`.

use super::format::{canonical_root, confine, confine_sample, read_text, validate, Dataset, Meta, OpenOptions, Sample};
use crate::error::{Error, IoContext, Result};
use image::{GrayImage, RgbImage};
use std::path::{Path, PathBuf};

pub const REF_DIR: &str = "ref";
pub const BACKGROUND: &str = "background.png";
pub const TARGET: &str = "real.png";
pub const PROMPT: &str = "description.txt";
pub const MASK: &str = "mask.png";
pub const META: &str = "meta.json";

const IMAGE_EXTS: [&str; 4] = ["png", "webp", "jpg", "jpeg"];

/// The integer after the last `_` of a name (`sample_12` -> 12), as the reference code sorts.
pub fn folder_index(name: &str) -> Option<u64> {
    name.rsplit('_').next().and_then(|s| s.parse().ok())
}

/// Sort key: folders with an index by that index, then the others by name.
fn order_key(name: &str) -> (u8, u64, String) {
    match folder_index(name) {
        Some(i) => (0, i, String::new()),
        None => (1, 0, name.to_string()),
    }
}

/// Read every sample folder under `root`; bad ones go to `skipped` with the reason. Every file
/// of a sample (symbolic links followed, `meta.json` paths included) must lie inside `root`;
/// a sample naming one outside is bad.
pub fn open_dir(root: &Path, opts: &OpenOptions) -> Result<Dataset> {
    let canon = canonical_root(root)?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).with_path(root)? {
        let entry = entry.with_path(root)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        names.push(name);
    }
    names.sort_by_key(|n| order_key(n));
    let mut ds = Dataset {
        root: root.to_path_buf(),
        samples: Vec::with_capacity(names.len()),
        skipped: Vec::new(),
    };
    for name in names {
        let dir = root.join(&name);
        let read = read_sample(&canon, &dir, &name).and_then(|s| confine_sample(&canon, &s).map(|_| s));
        match read.and_then(|s| validate(&s, opts).map(|_| s)) {
            Ok(s) => ds.samples.push(s),
            Err(reason) => ds.skipped.push((name, reason)),
        }
    }
    Ok(ds)
}

/// The paths and prompt of one sample folder; `Err(reason)` when a required part is absent.
fn read_sample(root: &Path, dir: &Path, id: &str) -> std::result::Result<Sample, String> {
    confine(root, dir)?;
    let ref_dir = dir.join(REF_DIR);
    confine(root, &ref_dir)?;
    if !ref_dir.is_dir() {
        return Err(format!("missing folder {}", ref_dir.display()));
    }
    let refs = list_images(&ref_dir).map_err(|e| e.to_string())?;
    let prompt_path = dir.join(PROMPT);
    if !prompt_path.is_file() {
        return Err(format!("missing file {}", prompt_path.display()));
    }
    confine(root, &prompt_path)?;
    let prompt = read_text(&prompt_path).map_err(|e| e.to_string())?;
    let meta_path = dir.join(META);
    let meta = if meta_path.is_file() {
        confine(root, &meta_path)?;
        let text = std::fs::read_to_string(&meta_path).map_err(|e| format!("{}: {e}", meta_path.display()))?;
        Some(serde_json::from_str::<Meta>(&text).map_err(|e| format!("{}: invalid JSON: {e}", meta_path.display()))?)
    } else {
        None
    };
    let target = dir.join(TARGET);
    let mask = dir.join(MASK);
    Ok(Sample {
        id: id.to_string(),
        dir: Some(dir.to_path_buf()),
        refs,
        background: dir.join(BACKGROUND),
        target: target.exists().then_some(target),
        mask: mask.exists().then_some(mask),
        prompt,
        meta,
    })
}

/// Image files of a folder, ordered by the integer in their stem when there is one
/// (`2.png` before `10.png`), then by name.
fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_path(dir)? {
        let p = entry.with_path(dir)?.path();
        let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if p.is_file() && IMAGE_EXTS.contains(&ext.as_str()) {
            files.push(p);
        }
    }
    files.sort_by_key(|p| {
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let digits: String = stem.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
        let num = digits.chars().rev().collect::<String>().parse::<u64>().ok();
        (num.is_none(), num.unwrap_or(0), stem)
    });
    Ok(files)
}

/// The images and text of one sample, to be written in the InstructAR layout.
pub struct SampleImages<'a> {
    pub refs: &'a [RgbImage],
    pub background: &'a RgbImage,
    pub target: Option<&'a RgbImage>,
    pub mask: Option<&'a GrayImage>,
    pub prompt: &'a str,
    pub meta: Option<&'a Meta>,
    /// Further masks written next to `mask.png` (e.g. `mask_0.png`), named relative to the folder.
    pub extra_masks: &'a [(String, GrayImage)],
}

/// Encode a PNG quickly (datasets hold many small images; speed over size).
pub fn png_bytes(img: &image::DynamicImage) -> Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut buf = Vec::new();
    let enc = PngEncoder::new_with_quality(&mut buf, CompressionType::Fast, FilterType::Sub);
    img.write_with_encoder(enc)
        .map_err(|e| Error::invalid("PNG encoding", e.to_string()))?;
    Ok(buf)
}

fn write_png(path: &Path, img: image::DynamicImage) -> Result<()> {
    std::fs::write(path, png_bytes(&img)?).with_path(path)
}

/// Write one sample folder at `dir` atomically: everything goes to a hidden sibling folder
/// which is renamed into place at the end, so `dir` exists only when it is complete.
/// Reference images are written as `ref/0.png`, `ref/1.png`, ...
pub fn write_sample(dir: &Path, s: &SampleImages) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::invalid("sample folder", format!("{} has no name", dir.display())))?;
    let tmp = dir.with_file_name(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_path(&tmp)?;
    }
    std::fs::create_dir_all(tmp.join(REF_DIR)).with_path(&tmp)?;
    for (i, r) in s.refs.iter().enumerate() {
        write_png(&tmp.join(REF_DIR).join(format!("{i}.png")), r.clone().into())?;
    }
    write_png(&tmp.join(BACKGROUND), s.background.clone().into())?;
    if let Some(t) = s.target {
        write_png(&tmp.join(TARGET), t.clone().into())?;
    }
    if let Some(m) = s.mask {
        write_png(&tmp.join(MASK), m.clone().into())?;
    }
    for (rel, m) in s.extra_masks {
        write_png(&tmp.join(rel), m.clone().into())?;
    }
    let p = tmp.join(PROMPT);
    std::fs::write(&p, s.prompt.as_bytes()).with_path(&p)?;
    if let Some(meta) = s.meta {
        let p = tmp.join(META);
        let text = serde_json::to_string_pretty(meta).map_err(|e| Error::invalid("meta.json", e.to_string()))?;
        std::fs::write(&p, text).with_path(&p)?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_path(dir)?;
    }
    std::fs::rename(&tmp, dir).with_path(dir)
}

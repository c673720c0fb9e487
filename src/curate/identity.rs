//! The identity filter of the InstructAR construction: DINO (v1 ViT-S/16) CLS embeddings of the
//! whole target and of each reference (the subject's foreground), score = 100 x cosine per
//! reference; a sample is kept when its lowest score is above the threshold (20 in the
//! reference pipeline). The network sees each image as the DINO metric does (resize the
//! shorter side to 256, centre crop 224, ImageNet normalisation), several images per call.

use super::report::{Report, Summary, Verdict};
use crate::data::{Dataset, Sample};
use crate::error::{Error, Result};
use crate::eval::nets::{find_weight_file, to_batch, DinoConfig, DinoEncoder, ImageEmbedder, DINO_V1_FILES};
use crate::imageio;
use candle_core::Device;
use image::RgbImage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The reference pipeline's threshold on the lowest score.
pub const DEFAULT_MIN_SCORE: f64 = 20.0;

/// Report and manifest names in the output folder.
pub const REPORT: &str = "identity.jsonl";
pub const KEPT: &str = "identity_kept.jsonl";

/// The weight file for `path`: the file itself, or in a folder the first of
/// [`DINO_V1_FILES`] present (else the first name, which the loader reports as missing
/// together with where the file comes from), as the DINO metric looks for it.
pub fn find_dino_weights(path: &Path) -> PathBuf {
    if path.is_dir() {
        find_weight_file(path, &DINO_V1_FILES)
    } else {
        path.to_path_buf()
    }
}

/// The DINO encoder from a weight file or a folder holding one.
pub fn load_dino(path: &Path, cfg: DinoConfig, device: &Device) -> Result<DinoEncoder> {
    DinoEncoder::load(cfg, &find_dino_weights(path), device)
}

#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// Keep a sample when its lowest score is strictly above this.
    pub min_score: f64,
    /// Images per network call.
    pub batch: usize,
    /// Decide again the samples an earlier run dropped because something failed.
    pub retry_errors: bool,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        Self { min_score: DEFAULT_MIN_SCORE, batch: 16, retry_errors: false }
    }
}

/// The report's filter label; a rerun into the same report must have the same threshold.
pub fn filter_label(min_score: f64) -> String {
    format!("identity min>{min_score}")
}

/// Keep or drop from the per-reference scores, with the reason.
pub fn decide(scores: &[f64], min_score: f64) -> (bool, String) {
    let Some((worst, low)) = scores.iter().copied().enumerate().min_by(|a, b| a.1.total_cmp(&b.1)) else {
        return (false, "no reference to score".to_string());
    };
    if low > min_score {
        (true, format!("lowest score {low:.2} > {min_score}"))
    } else {
        (false, format!("reference {worst} scores {low:.2}, not above {min_score}"))
    }
}

/// Embeddings of `images`, in order: images of one size go through the network together,
/// at most `batch` at a time.
pub fn embed_images(net: &dyn ImageEmbedder, images: &[&RgbImage], batch: usize, device: &Device) -> Result<Vec<Vec<f32>>> {
    if batch == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    let mut by_size: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        by_size.entry(img.dimensions()).or_default().push(i);
    }
    let mut out = vec![Vec::new(); images.len()];
    for idx in by_size.values() {
        for part in idx.chunks(batch) {
            let imgs: Vec<&RgbImage> = part.iter().map(|&i| images[i]).collect();
            let emb = net.embed(&to_batch(&imgs, device)?)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            if emb.len() != part.len() {
                return Err(Error::invalid(net.name(), format!("{} embeddings for {} images", emb.len(), part.len())));
            }
            for (&i, e) in part.iter().zip(emb) {
                out[i] = e;
            }
        }
    }
    Ok(out)
}

/// 100 x the cosine similarity of two embeddings (0 when either is all zeros).
pub fn cosine100(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        100.0 * dot / (na * nb)
    }
}

/// The scores of one sample's images: target first, then its references.
pub fn identity_scores(net: &dyn ImageEmbedder, target: &RgbImage, refs: &[RgbImage], device: &Device) -> Result<Vec<f64>> {
    let mut images = vec![target];
    images.extend(refs.iter());
    let emb = embed_images(net, &images, images.len(), device)?;
    Ok(emb[1..].iter().map(|r| cosine100(&emb[0], r)).collect())
}

/// A sample's target and references, decoded at their own size (RGBA onto white).
fn load_images(s: &Sample) -> Result<Vec<RgbImage>> {
    let target = s
        .target
        .as_ref()
        .ok_or_else(|| Error::invalid("sample", format!("{} has no target image (real.png)", s.id)))?;
    let mut images = vec![imageio::load_rgb(target, None)?];
    for r in &s.refs {
        images.push(imageio::load_rgb(r, None)?);
    }
    Ok(images)
}

/// Score every sample of `ds` not yet in `out/identity.jsonl`, append its verdict there, then
/// write the kept samples of the whole report to `out/identity_kept.jsonl`. A sample whose
/// images cannot be read is dropped with the reason; a network failure stops the run (the
/// report keeps what was decided). `progress(done, todo)` counts the samples of this run.
pub fn run_identity(
    ds: &Dataset,
    net: &dyn ImageEmbedder,
    device: &Device,
    opts: &IdentityOptions,
    out: &Path,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<Summary> {
    if !opts.min_score.is_finite() {
        return Err(Error::invalid("--min", format!("{} is not a number", opts.min_score)));
    }
    let label = filter_label(opts.min_score);
    let mut report = Report::open(&out.join(REPORT), &label)?;
    let todo: Vec<&Sample> = ds.samples.iter().filter(|s| report.pending(&s.id, opts.retry_errors)).collect();
    let mut done = 0;
    // Samples go through the network together until about `batch` images are gathered.
    let mut start = 0;
    while start < todo.len() {
        let mut end = start;
        let mut count = 0;
        while end < todo.len() && (end == start || count + 1 + todo[end].refs.len() <= opts.batch.max(1)) {
            count += 1 + todo[end].refs.len();
            end += 1;
        }
        let chunk = &todo[start..end];
        let mut loaded = Vec::new();
        for s in chunk {
            match load_images(s) {
                Ok(images) => loaded.push((*s, images)),
                Err(e) => report.record(Verdict::failed(s, &label, e.to_string()))?,
            }
        }
        let flat: Vec<&RgbImage> = loaded.iter().flat_map(|(_, imgs)| imgs.iter()).collect();
        let emb = embed_images(net, &flat, opts.batch, device)?;
        let mut at = 0;
        for (s, images) in &loaded {
            let target = &emb[at];
            let scores: Vec<f64> = emb[at + 1..at + images.len()].iter().map(|r| cosine100(target, r)).collect();
            at += images.len();
            let (kept, reason) = decide(&scores, opts.min_score);
            report.record(Verdict { scores: Some(scores), ..Verdict::new(s, &label, kept, reason) })?;
        }
        done += chunk.len();
        start = end;
        if let Some(p) = progress {
            p(done, todo.len());
        }
    }
    report.write_kept(&ds.samples, &ds.root, &out.join(KEPT))?;
    Ok(Summary { decided: todo.len(), resumed: ds.samples.len() - todo.len(), ..report.summary(&ds.samples) })
}

//! Folders of images for tokenizer training and evaluation: recursive listing, loading into
//! memory at a fixed size, batching, and the held-out evaluation (PSNR, codebook usage).

use super::{psnr, usage, Vq};
use crate::error::{Error, IoContext, Result};
use crate::imageio;
use candle_core::{Device, Tensor};
use image::RgbImage;
use std::path::{Path, PathBuf};

const IMAGE_EXTS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// File-name prefixes that are not pictures of a dataset: masks, and the contact sheet that
/// `tokenar data synth` writes next to a dataset.
pub const NOT_PICTURES: [&str; 2] = ["mask", "contact"];

/// Every image file under `dir` (recursively, sorted), skipping files whose name starts with
/// an entry of `exclude` (e.g. [`NOT_PICTURES`]).
pub fn list_images(dir: &Path, exclude: &[String]) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::bad_file(dir, "not a folder of images"));
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_path(&d)? {
            let p = entry.with_path(&d)?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
            if IMAGE_EXTS.contains(&ext.as_str()) && !exclude.iter().any(|e| name.starts_with(e.as_str())) {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::bad_file(dir, "contains no png/jpg/webp images"));
    }
    Ok(out)
}

/// Seed of [`subset`]: the same folder and limit always give the same images.
const SUBSET_SEED: u64 = 0x5ab5e7;

/// Which of `n` listed images to use with at most `limit`: all of them, or a seeded random
/// subset in list order. Not every k-th file: a dataset folder lists each sample's images
/// together (background, target, references), and a stride of 4 picked only backgrounds.
pub fn subset(n: usize, limit: Option<usize>) -> Vec<usize> {
    match limit {
        Some(k) if k < n => {
            let mut rng = crate::util::rng(SUBSET_SEED);
            let mut idx = rand::seq::index::sample(&mut rng, n, k).into_vec();
            idx.sort_unstable();
            idx
        }
        _ => (0..n).collect(),
    }
}

/// Load images resized to `size` x `size` (at most `limit` of them, see [`subset`]).
pub fn load_images(paths: &[PathBuf], size: u32, limit: Option<usize>) -> Result<Vec<RgbImage>> {
    subset(paths.len(), limit)
        .into_iter()
        .map(|i| imageio::load_rgb(&paths[i], Some(size)))
        .collect()
}

/// Stack images into a (B, 3, H, W) tensor in [-1, 1], mirrored horizontally where `flip[i]`.
pub fn batch(images: &[&RgbImage], flip: &[bool], device: &Device) -> Result<Tensor> {
    let mut ts = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        let t = if flip.get(i).copied().unwrap_or(false) {
            imageio::rgb_to_tensor(&image::imageops::flip_horizontal(*img), device)?
        } else {
            imageio::rgb_to_tensor(img, device)?
        };
        ts.push(t);
    }
    Ok(Tensor::stack(&ts, 0)?)
}

/// Held-out reconstruction quality.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub images: usize,
    /// Mean per-image PSNR in dB (images in [0, 1], data range 1).
    pub psnr: f64,
    /// Fraction of the codebook used by the codes of these images.
    pub usage: f64,
    pub codes_used: usize,
}

/// Encode and decode `images` in batches of `batch_size`; PSNR and codebook usage.
pub fn evaluate(vq: &Vq, images: &[RgbImage], batch_size: usize, device: &Device) -> Result<EvalReport> {
    if images.is_empty() {
        return Err(Error::invalid("evaluation set", "no images"));
    }
    let mut psnrs = Vec::with_capacity(images.len());
    let mut all_codes = Vec::new();
    for chunk in images.chunks(batch_size.max(1)) {
        let refs: Vec<&RgbImage> = chunk.iter().collect();
        let x = batch(&refs, &[], device)?;
        let codes = vq.encode(&x)?;
        let recon = vq.decode(&codes)?;
        psnrs.extend(psnr(&recon, &x)?);
        all_codes.push(codes.flatten_all()?);
    }
    let codes = Tensor::cat(&all_codes, 0)?;
    let k = vq.config().codebook_size;
    let u = usage(&codes, k)?;
    Ok(EvalReport {
        images: images.len(),
        psnr: psnrs.iter().sum::<f64>() / psnrs.len() as f64,
        usage: u,
        codes_used: (u * k as f64).round() as usize,
    })
}

/// Originals (top row) above their reconstructions (bottom row), as one image.
pub fn comparison(vq: &Vq, images: &[RgbImage], device: &Device) -> Result<RgbImage> {
    let refs: Vec<&RgbImage> = images.iter().collect();
    let x = batch(&refs, &[], device)?;
    let recon = vq.decode(&vq.encode(&x)?)?;
    let mut cells: Vec<RgbImage> = images.to_vec();
    for i in 0..images.len() {
        cells.push(imageio::tensor_to_rgb(&recon.get(i)?)?);
    }
    Ok(imageio::grid(&cells, images.len(), 2))
}

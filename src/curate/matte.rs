//! The matte split of the InstructAR construction: from a sample's target (`real.png`) and an
//! alpha matte of its subjects (written by any matting tool), the files the dataset needs:
//! `background.png` (the target with every pixel of alpha > 0 set to black), `mask.png` (alpha
//! > 0 white, else black) and `foreground.png` (the target as RGBA with the matte as alpha).
//!
//! The matte comes from one of two sources ([`MatteSource`]):
//! - files: `MATTES/<sample folder name>.png`, made by any matting tool. A grayscale matte is
//!   used as it is; a matte with an alpha channel (a cut-out) gives its alpha channel; an RGB
//!   matte its luminance. The foreground keeps the target's colours.
//! - BEN2 ([`crate::curate::ben2`]), run on each target as the TokenAR scripts run it
//!   (`refine_foreground=True`): the alpha is BEN2's 8-bit matte and the foreground's colours
//!   are its refined estimate.
//!
//! A threshold T (0..255 on the 8-bit matte; 0 by default, the reference's rule) decides which
//! pixels are subject: alpha > T. On the network's sigmoid output that is matte > T / 255,
//! i.e. a logit threshold of ln(T / (255 - T)).

use crate::curate::ben2::{self, Ben2};
use crate::data::instructar::{folder_index, png_bytes, BACKGROUND, MASK, TARGET};
use crate::error::{Error, IoContext, Result};
use crate::imageio;
use crate::util::atomic_write;
use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use std::path::{Path, PathBuf};

/// The foreground cut-out written next to the target.
pub const FOREGROUND: &str = "foreground.png";

/// The three images of a split.
#[derive(Debug, Clone)]
pub struct MatteParts {
    pub background: RgbImage,
    pub mask: GrayImage,
    pub foreground: RgbaImage,
}

/// The matte of an image: its alpha channel when it has one, else its luminance.
pub fn alpha_of(img: &DynamicImage) -> GrayImage {
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| Luma([rgba.get_pixel(x, y)[3]]))
    } else {
        img.to_luma8()
    }
}

/// Split a target by its matte (same size; checked by the caller): subject where alpha > 0.
pub fn split(target: &RgbImage, alpha: &GrayImage) -> MatteParts {
    split_with_threshold(target, alpha, 0)
}

/// Split a target by its matte (same size; checked by the caller): subject where alpha >
/// `threshold`.
pub fn split_with_threshold(target: &RgbImage, alpha: &GrayImage, threshold: u8) -> MatteParts {
    let (w, h) = target.dimensions();
    let inside = |x, y| alpha.get_pixel(x, y)[0] > threshold;
    MatteParts {
        background: RgbImage::from_fn(w, h, |x, y| if inside(x, y) { Rgb([0, 0, 0]) } else { *target.get_pixel(x, y) }),
        mask: GrayImage::from_fn(w, h, |x, y| Luma([if inside(x, y) { 255 } else { 0 }])),
        foreground: RgbaImage::from_fn(w, h, |x, y| {
            let [r, g, b] = target.get_pixel(x, y).0;
            Rgba([r, g, b, alpha.get_pixel(x, y)[0]])
        }),
    }
}

/// Split `target` by `matte` and write the three files into `dir` (each atomically). A matte of
/// another size than the target is an error naming both files.
pub fn split_files(target: &Path, matte: &Path, dir: &Path) -> Result<()> {
    split_files_with_threshold(target, matte, dir, 0)
}

fn split_files_with_threshold(target: &Path, matte: &Path, dir: &Path, threshold: u8) -> Result<()> {
    let t = imageio::load_rgb(target, None)?;
    let alpha = alpha_of(&imageio::open(matte)?);
    if alpha.dimensions() != t.dimensions() {
        return Err(Error::bad_file(
            matte,
            format!(
                "matte is {}x{} but the target {} is {}x{}",
                alpha.width(),
                alpha.height(),
                target.display(),
                t.width(),
                t.height()
            ),
        ));
    }
    write_parts(split_with_threshold(&t, &alpha, threshold), dir)
}

/// Cut `target` out with BEN2 and write the three files into `dir` (each atomically).
pub fn split_ben2(target: &Path, net: &Ben2, size: usize, dir: &Path, threshold: u8) -> Result<()> {
    let t = imageio::load_rgb(target, None)?;
    let cut = ben2::cut_out(net, &t, size)?;
    let mut parts = split_with_threshold(&t, &cut.alpha, threshold);
    parts.foreground = cut.foreground;
    write_parts(parts, dir)
}

fn write_parts(parts: MatteParts, dir: &Path) -> Result<()> {
    for (name, img) in [
        (BACKGROUND, DynamicImage::ImageRgb8(parts.background)),
        (MASK, DynamicImage::ImageLuma8(parts.mask)),
        (FOREGROUND, DynamicImage::ImageRgba8(parts.foreground)),
    ] {
        atomic_write(dir.join(name), &png_bytes(&img)?)?;
    }
    Ok(())
}

/// Where the matte of a sample folder named `name` is found.
pub fn matte_path(mattes: &Path, name: &str) -> PathBuf {
    mattes.join(format!("{name}.png"))
}

/// The outcome of a split over a dataset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatteRun {
    /// Sample folders written by this run.
    pub written: Vec<String>,
    /// Sample folders that already had all three files (kept as they are).
    pub existing: Vec<String>,
    /// (sample folder, reason) for every sample that could not be split.
    pub failed: Vec<(String, String)>,
}

/// The sample folders of an InstructAR tree (hidden ones excepted), in the reader's order.
fn sample_folders(root: &Path) -> Result<Vec<String>> {
    if !root.is_dir() {
        let why = if root.exists() {
            "the matte split works on an InstructAR folder tree (one folder per sample holding real.png), not a file"
        } else {
            "dataset folder not found"
        };
        return Err(Error::bad_file(root, why));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).with_path(root)? {
        let entry = entry.with_path(root)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            names.push(name);
        }
    }
    names.sort_by_key(|n| (folder_index(n).is_none(), folder_index(n).unwrap_or(0), n.clone()));
    Ok(names)
}

/// Where the mattes come from.
pub enum MatteSource<'a> {
    /// `MATTES/<sample folder name>.png`.
    Files(&'a Path),
    /// BEN2 run on each target at network input `size` (1024 as published).
    Ben2 { net: &'a Ben2, size: usize },
}

/// Split every sample folder of `root` by its matte `mattes/<folder name>.png` (subject where
/// alpha > 0); see [`run_matte_with`].
pub fn run_matte(root: &Path, mattes: &Path, overwrite: bool, progress: Option<&dyn Fn(usize, usize)>) -> Result<MatteRun> {
    run_matte_with(root, &MatteSource::Files(mattes), 0, overwrite, progress)
}

/// Split every sample folder of `root` by its matte from `source` (subject where alpha >
/// `threshold`). Folders that already hold `background.png`, `mask.png` and `foreground.png`
/// are left alone (a mask may have been refined by hand; an interrupted run resumes) unless
/// `overwrite`. A sample that cannot be split (missing target or matte, size mismatch,
/// unreadable image) is listed with the reason; the others are still written.
/// `progress(done, total)`.
pub fn run_matte_with(
    root: &Path,
    source: &MatteSource,
    threshold: u8,
    overwrite: bool,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<MatteRun> {
    if let MatteSource::Files(mattes) = source {
        if !mattes.is_dir() {
            return Err(Error::bad_file(mattes, "mattes folder not found (expected MATTES/<sample folder name>.png)"));
        }
    }
    let names = sample_folders(root)?;
    let mut run = MatteRun::default();
    for (i, name) in names.iter().enumerate() {
        let dir = root.join(name);
        let target = dir.join(TARGET);
        if !overwrite && [BACKGROUND, MASK, FOREGROUND].iter().all(|f| dir.join(f).is_file()) {
            run.existing.push(name.clone());
        } else if !target.is_file() {
            run.failed.push((name.clone(), format!("missing target {}", target.display())));
        } else {
            let done = match source {
                MatteSource::Files(mattes) => {
                    let matte = matte_path(mattes, name);
                    if matte.is_file() {
                        split_files_with_threshold(&target, &matte, &dir, threshold).map_err(|e| e.to_string())
                    } else {
                        Err(format!("missing matte {}", matte.display()))
                    }
                }
                MatteSource::Ben2 { net, size } => split_ben2(&target, net, *size, &dir, threshold).map_err(|e| e.to_string()),
            };
            match done {
                Ok(()) => run.written.push(name.clone()),
                Err(e) => run.failed.push((name.clone(), e)),
            }
        }
        if let Some(p) = progress {
            p(i + 1, names.len());
        }
    }
    Ok(run)
}

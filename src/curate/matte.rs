//! The matte split of the InstructAR construction: from a sample's target (`real.png`) and an
//! alpha matte of its subjects (written by any matting tool), the files the dataset needs:
//! `background.png` (the target with every pixel of alpha > 0 set to black), `mask.png` (alpha
//! > 0 white, else black) and `foreground.png` (the target as RGBA with the matte as alpha).
//!
//! Mattes are found as `MATTES/<sample folder name>.png`. A grayscale matte is used as it is;
//! a matte with an alpha channel (a cut-out, as many matting tools write) gives its alpha
//! channel; an RGB matte its luminance.

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

/// Split a target by its matte (same size; checked by the caller).
pub fn split(target: &RgbImage, alpha: &GrayImage) -> MatteParts {
    let (w, h) = target.dimensions();
    let inside = |x, y| alpha.get_pixel(x, y)[0] > 0;
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
    let parts = split(&t, &alpha);
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

/// Split every sample folder of `root` by its matte `mattes/<folder name>.png`. Folders that
/// already hold `background.png`, `mask.png` and `foreground.png` are left alone (a mask may
/// have been refined by hand) unless `overwrite`. A sample that cannot be split (missing
/// target or matte, size mismatch, unreadable image) is listed with the reason; the others
/// are still written. `progress(done, total)`.
pub fn run_matte(root: &Path, mattes: &Path, overwrite: bool, progress: Option<&dyn Fn(usize, usize)>) -> Result<MatteRun> {
    if !mattes.is_dir() {
        return Err(Error::bad_file(mattes, "mattes folder not found (expected MATTES/<sample folder name>.png)"));
    }
    let names = sample_folders(root)?;
    let mut run = MatteRun::default();
    for (i, name) in names.iter().enumerate() {
        let dir = root.join(name);
        let target = dir.join(TARGET);
        let matte = matte_path(mattes, name);
        if !overwrite && [BACKGROUND, MASK, FOREGROUND].iter().all(|f| dir.join(f).is_file()) {
            run.existing.push(name.clone());
        } else if !target.is_file() {
            run.failed.push((name.clone(), format!("missing target {}", target.display())));
        } else if !matte.is_file() {
            run.failed.push((name.clone(), format!("missing matte {}", matte.display())));
        } else {
            match split_files(&target, &matte, &dir) {
                Ok(()) => run.written.push(name.clone()),
                Err(e) => run.failed.push((name.clone(), e.to_string())),
            }
        }
        if let Some(p) = progress {
            p(i + 1, names.len());
        }
    }
    Ok(run)
}

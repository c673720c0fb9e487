//! Contact sheets: one row per sample with its references, background, mask and target, for
//! looking at a dataset at a glance.

use super::format::{Dataset, LoadedSample};
use crate::error::Result;
use crate::imageio::{grid, mask_to_rgb};
use image::{Rgb, RgbImage};

/// A grid of the first `rows` samples of `ds` that load at `size` px (samples that fail to
/// load are left out): references (padded with grey to the largest reference count among
/// them), background, mask (black when absent), target.
pub fn contact_sheet(ds: &Dataset, rows: usize, size: u32) -> Result<RgbImage> {
    if size == 0 {
        return Err(crate::Error::invalid("image size", "must be at least 1 pixel"));
    }
    let loaded: Vec<LoadedSample> = ds.samples.iter().filter_map(|s| s.load(size).ok()).take(rows).collect();
    let max_refs = loaded.iter().map(|l| l.refs.len()).max().unwrap_or(0);
    let blank = RgbImage::from_pixel(size, size, Rgb([128, 128, 128]));
    let mut cells = Vec::new();
    for l in loaded {
        let nrefs = l.refs.len();
        cells.extend(l.refs);
        cells.extend(std::iter::repeat_n(blank.clone(), max_refs - nrefs));
        cells.push(l.background);
        cells.push(l.mask.as_ref().map(mask_to_rgb).unwrap_or_else(|| RgbImage::new(size, size)));
        cells.push(l.target.unwrap_or_else(|| blank.clone()));
    }
    Ok(grid(&cells, max_refs + 3, 2))
}

//! Contact sheets: one row per sample with its references, background, mask and target, for
//! looking at a dataset at a glance.

use super::format::Dataset;
use crate::error::Result;
use crate::imageio::{grid, mask_to_rgb};
use image::{Rgb, RgbImage};

/// A grid of the first `rows` samples of `ds` at `size` px: references (padded with grey to the
/// largest reference count among them), background, mask (black when absent), target.
pub fn contact_sheet(ds: &Dataset, rows: usize, size: u32) -> Result<RgbImage> {
    let samples = &ds.samples[..rows.min(ds.samples.len())];
    let max_refs = samples.iter().map(|s| s.refs.len()).max().unwrap_or(0);
    let blank = RgbImage::from_pixel(size, size, Rgb([128, 128, 128]));
    let mut cells = Vec::new();
    for s in samples {
        let l = s.load(size)?;
        let nrefs = l.refs.len();
        cells.extend(l.refs);
        cells.extend(std::iter::repeat_n(blank.clone(), max_refs - nrefs));
        cells.push(l.background);
        cells.push(l.mask.as_ref().map(mask_to_rgb).unwrap_or_else(|| RgbImage::new(size, size)));
        cells.push(l.target.unwrap_or_else(|| blank.clone()));
    }
    Ok(grid(&cells, max_refs + 3, 2))
}

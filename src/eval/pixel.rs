//! Pixel metrics with torchmetrics' definitions (torchmetrics 1.9): MSE, PSNR and SSIM on
//! images in [0, 1], each over the whole image or over a region of a mask.
//!
//! - MSE: mean of squared differences over C x H x W.
//! - PSNR: `10 log10(data_range^2 / MSE)` with data range 1, computed per image (callers
//!   average over images). A perfect match would give +inf; the MSE is floored at
//!   [`MSE_FLOOR`] (PSNR at most 100 dB) so that reports stay finite.
//! - SSIM: Gaussian window 11 x 11 (sigma 1.5, built as torchmetrics does: offsets -5..5,
//!   normalised), K1 = 0.01, K2 = 0.03, data range 1, reflect padding of 5 on each side (no
//!   edge repeat, as `F.pad(mode="reflect")`), variances clamped at 0, and the mean over the
//!   whole C x H x W map (no border crop; torchmetrics 1.9 does not crop either).
//! - Masked variants: MSE/PSNR over the pixels of the region (all channels); masked SSIM is the
//!   mean of the same full-image SSIM map over the region's pixels (all channels), so the
//!   windows still see the pixels around the region. An empty region gives `None`.

use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};

/// MSE floor: keeps PSNR finite (at most 100 dB) for identical images.
pub const MSE_FLOOR: f64 = 1e-10;

/// A planar float image (C, H, W), values in [0, 1] for 8-bit inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Planar {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f64>,
}

impl Planar {
    /// RGB 8-bit to planar [0, 1] (value / 255).
    pub fn from_rgb(img: &RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0.0; 3 * h * w];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                data[c * h * w + i] = p[c] as f64 / 255.0;
            }
        }
        Planar { c: 3, h, w, data }
    }

    fn plane(&self, c: usize) -> &[f64] {
        &self.data[c * self.h * self.w..(c + 1) * self.h * self.w]
    }
}

/// Which pixels a metric looks at.
#[derive(Clone, Copy, Debug)]
pub enum Region<'a> {
    /// Every pixel.
    All,
    /// Pixels where the mask is > 127 (the subjects).
    Inside(&'a GrayImage),
    /// Pixels where the mask is <= 127 (the background to preserve).
    Outside(&'a GrayImage),
}

impl Region<'_> {
    /// Per-pixel weights (1 inside the region, 0 outside), or `None` for the whole image.
    fn weights(&self, h: usize, w: usize) -> Result<Option<Vec<bool>>> {
        let (mask, inside) = match self {
            Region::All => return Ok(None),
            Region::Inside(m) => (*m, true),
            Region::Outside(m) => (*m, false),
        };
        if mask.width() as usize != w || mask.height() as usize != h {
            return Err(Error::invalid(
                "mask",
                format!("mask is {}x{} but the images are {w}x{h}", mask.width(), mask.height()),
            ));
        }
        Ok(Some(mask.as_raw().iter().map(|&v| (v > 127) == inside).collect()))
    }
}

fn check_same(a: &Planar, b: &Planar) -> Result<()> {
    if (a.c, a.h, a.w) != (b.c, b.h, b.w) || a.data.len() != a.c * a.h * a.w {
        return Err(Error::invalid(
            "images",
            format!("prediction is {}x{}x{} but target is {}x{}x{}", a.c, a.h, a.w, b.c, b.h, b.w),
        ));
    }
    if a.h < 6 || a.w < 6 {
        return Err(Error::invalid("images", format!("{}x{} is too small (SSIM needs at least 6x6)", a.w, a.h)));
    }
    Ok(())
}

/// Mean over the region of a per-element (C, H, W) map; `None` for an empty region.
fn region_mean(map: impl Fn(usize) -> f64, c: usize, hw: usize, weights: &Option<Vec<bool>>) -> Option<f64> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for ch in 0..c {
        for i in 0..hw {
            if weights.as_ref().is_none_or(|w| w[i]) {
                sum += map(ch * hw + i);
                n += 1;
            }
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// Mean squared error over the region.
pub fn mse(pred: &Planar, target: &Planar, region: Region) -> Result<Option<f64>> {
    check_same(pred, target)?;
    let wts = region.weights(pred.h, pred.w)?;
    Ok(region_mean(|i| (pred.data[i] - target.data[i]).powi(2), pred.c, pred.h * pred.w, &wts))
}

/// PSNR in dB with data range 1 from an MSE (floored at [`MSE_FLOOR`]).
pub fn psnr_from_mse(mse: f64) -> f64 {
    -10.0 * mse.max(MSE_FLOOR).log10()
}

pub fn psnr(pred: &Planar, target: &Planar, region: Region) -> Result<Option<f64>> {
    Ok(mse(pred, target, region)?.map(psnr_from_mse))
}

/// The normalised 1-D Gaussian window torchmetrics builds (`_gaussian_kernel_1d`).
pub fn gaussian_window(size: usize, sigma: f64) -> Vec<f64> {
    let half = (size as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..size).map(|i| (-((i as f64 - half) / sigma).powi(2) / 2.0).exp()).collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|v| v / s).collect()
}

/// Reflect index (no edge repeat), as PyTorch's reflect padding; `pad < n` is required.
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let mut i = i;
    if i < 0 {
        i = -i;
    }
    if i >= n {
        i = 2 * (n - 1) - i;
    }
    i as usize
}

/// Separable Gaussian filter of one plane with reflect padding; output has the input's size.
fn blur(plane: &[f64], h: usize, w: usize, win: &[f64]) -> Vec<f64> {
    let r = win.len() / 2;
    let mut tmp = vec![0.0; h * w];
    let mut padded = vec![0.0; w + 2 * r];
    for y in 0..h {
        let row = &plane[y * w..(y + 1) * w];
        for (i, p) in padded.iter_mut().enumerate() {
            *p = row[reflect(i as isize - r as isize, w)];
        }
        for (x, t) in tmp[y * w..(y + 1) * w].iter_mut().enumerate() {
            *t = win.iter().zip(&padded[x..x + win.len()]).map(|(g, v)| g * v).sum();
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        let dst = &mut out[y * w..(y + 1) * w];
        for (k, g) in win.iter().enumerate() {
            let src = reflect(y as isize + k as isize - r as isize, h) * w;
            for (o, v) in dst.iter_mut().zip(&tmp[src..src + w]) {
                *o += g * v;
            }
        }
    }
    out
}

/// The full SSIM map (C, H, W) with torchmetrics' constants and data range 1.
pub fn ssim_map(pred: &Planar, target: &Planar) -> Result<Vec<f64>> {
    check_same(pred, target)?;
    let (h, w) = (pred.h, pred.w);
    let win = gaussian_window(11, 1.5);
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let mut out = Vec::with_capacity(pred.data.len());
    for ch in 0..pred.c {
        let (p, t) = (pred.plane(ch), target.plane(ch));
        let prod = |f: &dyn Fn(f64, f64) -> f64| -> Vec<f64> { p.iter().zip(t).map(|(&a, &b)| f(a, b)).collect() };
        let mp = blur(p, h, w, &win);
        let mt = blur(t, h, w, &win);
        let mpp = blur(&prod(&|a, _| a * a), h, w, &win);
        let mtt = blur(&prod(&|_, b| b * b), h, w, &win);
        let mpt = blur(&prod(&|a, b| a * b), h, w, &win);
        for i in 0..h * w {
            let (mu_p2, mu_t2, mu_pt) = (mp[i] * mp[i], mt[i] * mt[i], mp[i] * mt[i]);
            let sp = (mpp[i] - mu_p2).max(0.0);
            let st = (mtt[i] - mu_t2).max(0.0);
            let spt = mpt[i] - mu_pt;
            out.push(((2.0 * mu_pt + c1) * (2.0 * spt + c2)) / ((mu_p2 + mu_t2 + c1) * (sp + st + c2)));
        }
    }
    Ok(out)
}

/// SSIM: mean of the SSIM map over the region (all channels).
pub fn ssim(pred: &Planar, target: &Planar, region: Region) -> Result<Option<f64>> {
    let map = ssim_map(pred, target)?;
    let wts = region.weights(pred.h, pred.w)?;
    Ok(region_mean(|i| map[i], pred.c, pred.h * pred.w, &wts))
}

/// MSE, PSNR and SSIM of one region, sharing one SSIM map.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PixelScores {
    pub mse: f64,
    pub psnr: f64,
    pub ssim: f64,
}

/// The three scores of one region from a precomputed [`ssim_map`]; `None` for an empty region.
pub fn region_scores(pred: &Planar, target: &Planar, map: &[f64], region: Region) -> Result<Option<PixelScores>> {
    check_same(pred, target)?;
    if map.len() != pred.data.len() {
        return Err(Error::invalid("SSIM map", format!("{} values for {} pixels", map.len(), pred.data.len())));
    }
    let wts = region.weights(pred.h, pred.w)?;
    let hw = pred.h * pred.w;
    let m = region_mean(|i| (pred.data[i] - target.data[i]).powi(2), pred.c, hw, &wts);
    let s = region_mean(|i| map[i], pred.c, hw, &wts);
    Ok(m.zip(s).map(|(m, s)| PixelScores { mse: m, psnr: psnr_from_mse(m), ssim: s }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    fn img(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Planar {
        Planar::from_rgb(&RgbImage::from_fn(w, h, |x, y| Rgb(f(x, y))))
    }

    #[test]
    fn identical_images_are_perfect() {
        let a = img(12, 9, |x, y| [(x * 20) as u8, (y * 25) as u8, 90]);
        assert_eq!(mse(&a, &a, Region::All).unwrap(), Some(0.0));
        assert!((ssim(&a, &a, Region::All).unwrap().unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(psnr(&a, &a, Region::All).unwrap(), Some(100.0));
    }

    #[test]
    fn masked_regions_split_the_error() {
        let a = img(8, 8, |_, _| [0, 0, 0]);
        let b = img(8, 8, |x, _| if x < 4 { [255, 255, 255] } else { [0, 0, 0] });
        let mask = GrayImage::from_fn(8, 8, |x, _| Luma([if x < 4 { 255 } else { 0 }]));
        assert_eq!(mse(&a, &b, Region::Inside(&mask)).unwrap(), Some(1.0));
        assert_eq!(mse(&a, &b, Region::Outside(&mask)).unwrap(), Some(0.0));
        assert_eq!(mse(&a, &b, Region::All).unwrap(), Some(0.5));
        let empty = GrayImage::new(8, 8);
        assert_eq!(mse(&a, &b, Region::Inside(&empty)).unwrap(), None);
        let small = GrayImage::new(4, 4);
        assert!(mse(&a, &b, Region::Inside(&small)).is_err());
        let c = img(7, 8, |_, _| [0, 0, 0]);
        assert!(mse(&a, &c, Region::All).unwrap_err().to_string().contains("7"));
    }

    #[test]
    fn reflect_matches_torch() {
        // F.pad([0,1,2,3,4], (2,2), "reflect") == [2,1,0,1,2,3,4,3,2]
        let idx: Vec<usize> = (-2..7).map(|i| reflect(i, 5)).collect();
        assert_eq!(idx, vec![2, 1, 0, 1, 2, 3, 4, 3, 2]);
    }
}

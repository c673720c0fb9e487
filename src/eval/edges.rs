//! Edge F1: Canny edge maps of the prediction and the target compared as binary maps.
//!
//! What is matched exactly is OpenCV's `cv2.Canny(grey, 100, 200)` with its defaults
//! (aperture 3, `L2gradient=False`) on `cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)`:
//! - grey = `(9798 R + 19235 G + 3735 B + 2^14) >> 15` (OpenCV's fixed-point BT.601 weights);
//! - no blur inside Canny; 3x3 Sobel dx, dy with replicated borders;
//! - magnitude = |dx| + |dy| (L1); thresholds floored to integers;
//! - non-maximum suppression in 4 directions split at tan(22.5 deg) in OpenCV's fixed point
//!   (`TG22 = 13573`, shift 15), comparing `>` towards the lower index and `>=` towards the
//!   higher one (`>` both ways on diagonals), magnitudes outside the image counted as 0;
//! - hysteresis: pixels with magnitude > high that survive suppression are edges; surviving
//!   pixels with magnitude > low join when 8-connected to an edge.
//!
//! F1 = 2 |P & T| / (|P| + |T|) over edge pixels; two empty edge maps count as F1 = 1.

use image::{GrayImage, RgbImage};

pub const CANNY_LOW: f64 = 100.0;
pub const CANNY_HIGH: f64 = 200.0;

/// OpenCV's `COLOR_RGB2GRAY` for 8-bit images.
pub fn rgb_to_grey(img: &RgbImage) -> GrayImage {
    let mut out = GrayImage::new(img.width(), img.height());
    for (o, p) in out.pixels_mut().zip(img.pixels()) {
        let v = 9798 * p[0] as u32 + 19235 * p[1] as u32 + 3735 * p[2] as u32;
        o[0] = ((v + (1 << 14)) >> 15).min(255) as u8;
    }
    out
}

/// Binary Canny edge map (true = edge) as `cv2.Canny(grey, low, high)` computes it.
pub fn canny(grey: &GrayImage, low: f64, high: f64) -> Vec<bool> {
    let (w, h) = (grey.width() as usize, grey.height() as usize);
    let px = |x: isize, y: isize| -> i32 {
        let xc = x.clamp(0, w as isize - 1) as usize;
        let yc = y.clamp(0, h as isize - 1) as usize;
        grey.as_raw()[yc * w + xc] as i32
    };
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    // Magnitudes with a one-pixel zero frame: index (y + 1) * (w + 2) + (x + 1).
    let mw = w + 2;
    let mut mag = vec![0i32; mw * (h + 2)];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let gx = px(x + 1, y - 1) + 2 * px(x + 1, y) + px(x + 1, y + 1)
                - px(x - 1, y - 1)
                - 2 * px(x - 1, y)
                - px(x - 1, y + 1);
            let gy = px(x - 1, y + 1) + 2 * px(x, y + 1) + px(x + 1, y + 1)
                - px(x - 1, y - 1)
                - 2 * px(x, y - 1)
                - px(x + 1, y - 1);
            let i = y as usize * w + x as usize;
            dx[i] = gx;
            dy[i] = gy;
            mag[(y as usize + 1) * mw + x as usize + 1] = gx.abs() + gy.abs();
        }
    }
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    const SHIFT: i32 = 15;
    const TG22: i64 = 13573; // (int)(tan(22.5 deg) * 2^15 + 0.5)
    // 0 = not an edge, 1 = weak candidate, 2 = edge.
    let mut state = vec![0u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let m = mag[(y + 1) * mw + x + 1];
            if m <= low {
                continue;
            }
            let at = |ddx: isize, ddy: isize| mag[((y + 1) as isize + ddy) as usize * mw + ((x + 1) as isize + ddx) as usize];
            let (xs, ys) = (dx[y * w + x] as i64, dy[y * w + x] as i64);
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let keep = if ay < tg22x {
                m > at(-1, 0) && m >= at(1, 0)
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    m > at(0, -1) && m >= at(0, 1)
                } else {
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > at(-s, -1) && m > at(s, 1)
                }
            };
            if keep {
                if m > high {
                    state[y * w + x] = 2;
                    stack.push((x, y));
                } else {
                    state[y * w + x] = 1;
                }
            }
        }
    }
    while let Some((x, y)) = stack.pop() {
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                if state[ny * w + nx] == 1 {
                    state[ny * w + nx] = 2;
                    stack.push((nx, ny));
                }
            }
        }
    }
    state.into_iter().map(|s| s == 2).collect()
}

/// Canny edge map of an RGB image with the default thresholds 100/200.
pub fn edge_map(img: &RgbImage) -> Vec<bool> {
    canny(&rgb_to_grey(img), CANNY_LOW, CANNY_HIGH)
}

/// F1 between two binary maps of the same length (1 when both are empty).
pub fn f1(pred: &[bool], target: &[bool]) -> f64 {
    let both = pred.iter().zip(target).filter(|(a, b)| **a && **b).count();
    let np = pred.iter().filter(|v| **v).count();
    let nt = target.iter().filter(|v| **v).count();
    if np + nt == 0 {
        1.0
    } else {
        2.0 * both as f64 / (np + nt) as f64
    }
}

/// Edge F1 between a prediction and a target of the same size.
pub fn edge_f1(pred: &RgbImage, target: &RgbImage) -> crate::Result<f64> {
    if pred.dimensions() != target.dimensions() {
        return Err(crate::Error::invalid(
            "images",
            format!("prediction is {:?} but target is {:?}", pred.dimensions(), target.dimensions()),
        ));
    }
    Ok(f1(&edge_map(pred), &edge_map(target)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn square_has_closed_edges_and_f1_behaves() {
        let img = RgbImage::from_fn(16, 16, |x, y| {
            if (4..12).contains(&x) && (4..12).contains(&y) { Rgb([255, 255, 255]) } else { Rgb([0, 0, 0]) }
        });
        let e = edge_map(&img);
        assert!(e.iter().filter(|v| **v).count() >= 28);
        assert!(!e[0] && !e[8 * 16 + 8], "flat regions carry no edges");
        assert_eq!(f1(&e, &e), 1.0);
        let flat = edge_map(&RgbImage::new(16, 16));
        assert_eq!(f1(&e, &flat), 0.0);
        assert_eq!(f1(&flat, &flat), 1.0);
        assert!(edge_f1(&img, &RgbImage::new(15, 16)).is_err());
    }
}

//! Pillow's 8-bit resampling (`Image.resize` with LANCZOS or BICUBIC), reproduced to the
//! byte: separable, horizontal pass first, each pass rounding to 8 bits. Filter weights are
//! computed in f64 over the support scaled by the reduction factor (antialiasing when
//! shrinking), normalised to sum 1, then turned into fixed point with 22 fractional bits;
//! each output is `clamp((2^21 + sum(pixel * weight)) >> 22, 0, 255)`.

use image::{GrayImage, RgbImage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Lanczos, a = 3 (`Image.LANCZOS`).
    Lanczos,
    /// Keys cubic, a = -0.5 (`Image.BICUBIC`, `resize`'s default for RGB and L images).
    Bicubic,
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Filter::Bicubic => crate::eval::nets::preprocess::cubic(x),
        }
    }
}

/// Per output position: first input index and the fixed-point weights.
fn coefficients(input: usize, output: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..output)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut w: Vec<f64> = (0..n).map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                }
            }
            let fixed = w
                .iter()
                .map(|&v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an interleaved 8-bit image of `channels` channels, as Pillow does.
pub fn resize_u8(data: &[u8], (w, h): (usize, usize), channels: usize, (ow, oh): (usize, usize), filter: Filter) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut cur = data.to_vec();
    let mut cw = w;
    if ow != w {
        let co = coefficients(w, ow, filter);
        let mut out = vec![0u8; ow * h * channels];
        for y in 0..h {
            for (xx, (xmin, k)) in co.iter().enumerate() {
                for c in 0..channels {
                    let mut s = half;
                    for (i, &kv) in k.iter().enumerate() {
                        s += cur[(y * w + xmin + i) * channels + c] as i64 * kv as i64;
                    }
                    out[(y * ow + xx) * channels + c] = clip8(s);
                }
            }
        }
        cur = out;
        cw = ow;
    }
    if oh != h {
        let co = coefficients(h, oh, filter);
        let mut out = vec![0u8; cw * oh * channels];
        for (yy, (ymin, k)) in co.iter().enumerate() {
            for x in 0..cw {
                for c in 0..channels {
                    let mut s = half;
                    for (i, &kv) in k.iter().enumerate() {
                        s += cur[((ymin + i) * cw + x) * channels + c] as i64 * kv as i64;
                    }
                    out[(yy * cw + x) * channels + c] = clip8(s);
                }
            }
        }
        cur = out;
    }
    cur
}

/// `Image.resize((w, h), filter)` of an RGB image.
pub fn resize_rgb(img: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    let data = resize_u8(img.as_raw(), (img.width() as usize, img.height() as usize), 3, (w as usize, h as usize), filter);
    RgbImage::from_raw(w, h, data).expect("resize keeps the buffer size")
}

/// `Image.resize((w, h), filter)` of a grayscale (mode L) image.
pub fn resize_gray(img: &GrayImage, w: u32, h: u32, filter: Filter) -> GrayImage {
    let data = resize_u8(img.as_raw(), (img.width() as usize, img.height() as usize), 1, (w as usize, h as usize), filter);
    GrayImage::from_raw(w, h, data).expect("resize keeps the buffer size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_stays_constant_and_weights_sum_to_one() {
        for f in [Filter::Lanczos, Filter::Bicubic] {
            for (i, o) in [(7, 19), (19, 7), (512, 90)] {
                for (_, k) in coefficients(i, o, f) {
                    let s: i32 = k.iter().sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i32, "{f:?} {i}->{o}: {s}");
                }
            }
            let img = vec![200u8; 7 * 5 * 3];
            let out = resize_u8(&img, (7, 5), 3, (13, 3), f);
            assert!(out.iter().all(|&v| v == 200), "{f:?}");
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img: Vec<u8> = (0..48).map(|v| v as u8 * 5).collect();
        assert_eq!(resize_u8(&img, (4, 4), 3, (4, 4), Filter::Lanczos), img);
    }
}

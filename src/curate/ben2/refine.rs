//! The foreground refinement of `refine_foreground=True` (blur-fusion foreground estimation,
//! Photoroom's fast-foreground-estimation as BiRefNet and BEN2 use it): with image I and
//! matte a in [0, 1], one pass with box radius r computes
//!
//!   F_b = box(F * a) / (box(a) + 1e-5),  B_b = box(B * (1 - a)) / (1 - box(a) + 1e-5),
//!   F'  = clip(F_b + a * (I - a * F_b - (1 - a) * B_b), 0, 1);
//!
//! the estimate is a first pass with F = B = I and r = 90, then a second with F = F', B = B_b
//! and r = 6. `box` is OpenCV's normalised box filter (`cv2.blur`): an r x r window anchored at
//! r / 2 (so rows y - r/2 .. y + r - 1 - r/2), mirrored borders without repeating the edge
//! (BORDER_REFLECT_101), computed in f64 as running sums, rows first, then columns.

/// A planar f64 image: `c` channels of `h` x `w`, channel-interleaved.
#[derive(Debug, Clone)]
pub struct Plane {
    pub w: usize,
    pub h: usize,
    pub c: usize,
    pub data: Vec<f64>,
}

/// OpenCV's `borderInterpolate` for BORDER_REFLECT_101 (also for offsets past the far edge).
fn reflect101(mut p: i64, len: i64) -> usize {
    if len == 1 {
        return 0;
    }
    while p < 0 || p >= len {
        if p < 0 {
            p = -p;
        } else {
            p = 2 * (len - 1) - p;
        }
    }
    p as usize
}

/// `cv2.blur(x, (r, r))`.
pub fn box_blur(x: &Plane, r: usize) -> Plane {
    let (w, h, c) = (x.w, x.h, x.c);
    let anchor = (r / 2) as i64;
    // rows: sums over columns x - anchor .. x - anchor + r - 1 (running sum, as OpenCV's RowSum)
    let mut rows = vec![0f64; w * h * c];
    let cols: Vec<usize> = (0..(w + r - 1) as i64).map(|i| reflect101(i - anchor, w as i64)).collect();
    for y in 0..h {
        let src = &x.data[y * w * c..(y + 1) * w * c];
        for ch in 0..c {
            let at = |i: usize| src[cols[i] * c + ch];
            let mut s = 0.0;
            for i in 0..r {
                s += at(i);
            }
            rows[(y * w) * c + ch] = s;
            for xx in 1..w {
                s += at(xx - 1 + r) - at(xx - 1);
                rows[(y * w + xx) * c + ch] = s;
            }
        }
    }
    // columns: OpenCV's ColumnSum keeps SUM of the last r - 1 rows; out = (SUM + new) * scale,
    // then SUM = SUM + new - oldest
    let scale = 1.0 / (r * r) as f64;
    let rws: Vec<usize> = (0..(h + r - 1) as i64).map(|i| reflect101(i - anchor, h as i64)).collect();
    let mut out = vec![0f64; w * h * c];
    let n = w * c;
    let mut sum = vec![0f64; n];
    for &ry in rws.iter().take(r - 1) {
        for (i, s) in sum.iter_mut().enumerate() {
            *s += rows[ry * n + i];
        }
    }
    for y in 0..h {
        let sp = rws[y + r - 1];
        let sm = rws[y];
        for i in 0..n {
            let s0 = sum[i] + rows[sp * n + i];
            out[y * n + i] = s0 * scale;
            sum[i] = s0 - rows[sm * n + i];
        }
    }
    Plane { w, h, c, data: out }
}

/// One blur-fusion pass; returns (F', B_b).
fn fusion_pass(image: &Plane, f: &Plane, b: &Plane, alpha: &[f64], r: usize) -> (Plane, Plane) {
    let (w, h, c) = (image.w, image.h, image.c);
    let a = Plane { w, h, c: 1, data: alpha.to_vec() };
    let blurred_a = box_blur(&a, r);
    let mut fa = f.clone();
    let mut b1a = b.clone();
    for p in 0..w * h {
        for ch in 0..c {
            fa.data[p * c + ch] = f.data[p * c + ch] * alpha[p];
            b1a.data[p * c + ch] = b.data[p * c + ch] * (1.0 - alpha[p]);
        }
    }
    let blurred_fa = box_blur(&fa, r);
    let blurred_b1a = box_blur(&b1a, r);
    let mut new_f = image.clone();
    let mut blurred_b = image.clone();
    for p in 0..w * h {
        let ba = blurred_a.data[p];
        let al = alpha[p];
        for ch in 0..c {
            let i = p * c + ch;
            let bf = blurred_fa.data[i] / (ba + 1e-5);
            let bb = blurred_b1a.data[i] / ((1.0 - ba) + 1e-5);
            blurred_b.data[i] = bb;
            let v = bf + al * (image.data[i] - al * bf - (1.0 - al) * bb);
            new_f.data[i] = v.clamp(0.0, 1.0);
        }
    }
    (new_f, blurred_b)
}

/// The refined foreground colours of `image` (RGB, 8 bits) under `alpha` (8 bits, same size),
/// as 8 bits (`(F * 255)` truncated, as numpy's `astype(uint8)`).
pub fn refine_foreground(image: &image::RgbImage, alpha: &image::GrayImage) -> image::RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let img = Plane { w, h, c: 3, data: image.as_raw().iter().map(|&v| v as f64 / 255.0).collect() };
    let a: Vec<f64> = alpha.as_raw().iter().map(|&v| v as f64 / 255.0).collect();
    let (f1, b1) = fusion_pass(&img, &img, &img, &a, 90);
    let (f2, _) = fusion_pass(&img, &f1, &b1, &a, 6);
    let data = f2.data.iter().map(|&v| (v * 255.0) as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, data).expect("same size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_101_and_box_of_a_constant() {
        assert_eq!(reflect101(-1, 5), 1);
        assert_eq!(reflect101(5, 5), 3);
        assert_eq!(reflect101(-7, 5), 1); // 7 -> 8 - 7 = 1
        assert_eq!(reflect101(3, 1), 0);
        let p = Plane { w: 4, h: 3, c: 2, data: vec![0.25; 24] };
        for r in [1, 2, 6, 90] {
            assert!(box_blur(&p, r).data.iter().all(|v| (v - 0.25).abs() < 1e-12), "r {r}");
        }
        // a 1-d ramp with r = 2 averages x - 1 and x (anchor 1)
        let ramp = Plane { w: 4, h: 1, c: 1, data: vec![0.0, 1.0, 2.0, 3.0] };
        let b = box_blur(&ramp, 2);
        assert_eq!(b.data, vec![0.5, 0.5, 1.5, 2.5]);
    }

    #[test]
    fn opaque_matte_keeps_the_image() {
        let img = image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([(x * 20) as u8, (y * 30) as u8, 128]));
        let alpha = image::GrayImage::from_pixel(9, 7, image::Luma([255]));
        let f = refine_foreground(&img, &alpha);
        for (a, b) in f.as_raw().iter().zip(img.as_raw()) {
            assert!((*a as i32 - *b as i32).abs() <= 1);
        }
    }
}

//! Image preprocessing shared by the metric networks: resizing with the exact kernels the
//! reference pipelines use, centre crops and per-channel normalisation.
//!
//! Resizing is separable and linear, so it is done as two matrix products with precomputed
//! (out, in) weight matrices: `W_h @ x @ W_w^T`.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// How to resample when resizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` without
    /// antialiasing (what pytorch-fid uses to bring images to 299x299).
    BilinearTorch,
    /// Bicubic with antialiasing as PIL / torchvision `Resize(antialias=True)` do it
    /// (Keys cubic with a = -0.5, support widened by the scale when shrinking, weights
    /// renormalised at the borders).
    BicubicAntialias,
    /// Bilinear (triangle filter) with antialiasing, PIL style.
    BilinearAntialias,
}

/// PIL's bicubic kernel (a = -0.5).
pub(crate) fn cubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

fn triangle(x: f64) -> f64 {
    (1.0 - x.abs()).max(0.0)
}

/// The (out, in) resampling matrix for one axis.
pub fn resize_matrix(input: usize, output: usize, mode: Resample) -> Vec<f64> {
    let mut m = vec![0f64; output * input];
    let scale = input as f64 / output as f64;
    match mode {
        Resample::BilinearTorch => {
            for i in 0..output {
                let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(input - 1);
                let i1 = (i0 + 1).min(input - 1);
                let l = src - i0 as f64;
                m[i * input + i0] += 1.0 - l;
                m[i * input + i1] += l;
            }
        }
        Resample::BicubicAntialias | Resample::BilinearAntialias => {
            let (filter, support): (fn(f64) -> f64, f64) = match mode {
                Resample::BicubicAntialias => (cubic, 2.0),
                _ => (triangle, 1.0),
            };
            let filterscale = scale.max(1.0);
            let support = support * filterscale;
            for i in 0..output {
                let center = (i as f64 + 0.5) * scale;
                let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
                let xmax = ((center + support + 0.5).floor() as usize).min(input);
                let mut total = 0.0;
                for j in xmin..xmax {
                    let w = filter((j as f64 - center + 0.5) / filterscale);
                    m[i * input + j] = w;
                    total += w;
                }
                if total != 0.0 {
                    for j in xmin..xmax {
                        m[i * input + j] /= total;
                    }
                }
            }
        }
    }
    m
}

/// Resize a (B, C, H, W) f32 tensor to (B, C, out_h, out_w).
pub fn resize(x: &Tensor, out_h: usize, out_w: usize, mode: Resample) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(Error::invalid("resize", format!("cannot resize {h}x{w} to {out_h}x{out_w}")));
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let mh = matrix_tensor(h, out_h, mode, dev)?; // (out_h, h)
    let mw = matrix_tensor(w, out_w, mode, dev)?.t()?; // (w, out_w)
    let x = x.to_dtype(DType::F32)?;
    // rows: (B,C,H,W) @ (W,out_w) -> (B,C,H,out_w); then (out_h,H) @ that.
    let y = x.broadcast_matmul(&mw.contiguous()?)?;
    let y = mh.broadcast_matmul(&y)?;
    Ok(y)
}

fn matrix_tensor(input: usize, output: usize, mode: Resample, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = resize_matrix(input, output, mode).into_iter().map(|v| v as f32).collect();
    Ok(Tensor::from_vec(m, (output, input), dev)?)
}

/// Resize so that the shorter side becomes `size`, keeping the aspect ratio (torchvision
/// `Resize(size)` with an int: the longer side is `int(size * long / short)`).
pub fn resize_shorter(x: &Tensor, size: usize, mode: Resample) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = if h <= w {
        (size, (size as u64 * w as u64 / h.max(1) as u64) as usize)
    } else {
        ((size as u64 * h as u64 / w.max(1) as u64) as usize, size)
    };
    resize(x, oh, ow, mode)
}

/// Centre crop to (size, size) as torchvision `CenterCrop` does (offset rounded half to
/// even, as Python's `round`).
pub fn center_crop(x: &Tensor, size: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < size || w < size {
        return Err(Error::invalid("center crop", format!("image {h}x{w} is smaller than {size}")));
    }
    let top = ((h - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((w - size) as f64 / 2.0).round_ties_even() as usize;
    Ok(x.narrow(2, top, size)?.narrow(3, left, size)?)
}

/// Map images from [-1, 1] to [0, 1], then `(x - mean) / std` per channel.
pub fn normalize_from_signed(x: &Tensor, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let dev = x.device();
    let mean = Tensor::new(&mean, dev)?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&std, dev)?.reshape((1, 3, 1, 1))?;
    let x01 = ((x + 1.0)? * 0.5)?;
    Ok(x01.broadcast_sub(&mean)?.broadcast_div(&std)?)
}

/// Check that a batch is (B, 3, H, W) with B > 0.
pub fn check_images(what: &str, x: &Tensor) -> Result<()> {
    match x.dims() {
        [b, 3, h, w] if *b > 0 && *h > 0 && *w > 0 => Ok(()),
        d => Err(Error::invalid(what, format!("expected images (B,3,H,W) in [-1,1], got shape {d:?}"))),
    }
}

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_rows_sum_to_one() {
        for mode in [Resample::BilinearTorch, Resample::BicubicAntialias, Resample::BilinearAntialias] {
            for (i, o) in [(7, 3), (3, 7), (16, 16), (10, 4)] {
                let m = resize_matrix(i, o, mode);
                for r in 0..o {
                    let s: f64 = m[r * i..(r + 1) * i].iter().sum();
                    assert!((s - 1.0).abs() < 1e-9, "{mode:?} {i}->{o} row {r} sums to {s}");
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_crop_centres() -> Result<()> {
        let x = Tensor::full(0.25f32, (1, 3, 9, 13), &Device::Cpu)?;
        let y = resize_shorter(&x, 6, Resample::BicubicAntialias)?;
        assert_eq!(y.dims(), &[1, 3, 6, 8]);
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|a| (a - 0.25).abs() < 1e-5));
        let idx = Tensor::arange(0f32, 25.0, &Device::Cpu)?.reshape((1, 1, 5, 5))?.repeat((1, 3, 1, 1))?;
        let c = center_crop(&idx, 3)?;
        assert_eq!(c.flatten_all()?.to_vec1::<f32>()?[0], 6.0);
        assert!(center_crop(&idx, 6).is_err());
        Ok(())
    }
}

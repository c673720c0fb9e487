//! The tensor operations BEN2 is built from, each with PyTorch's exact semantics: 3x3 conv
//! with InstanceNorm and erf-GELU, bilinear resizing with `align_corners=False` and no
//! antialiasing, nearest resizing (`floor(dst * in / out)`), adaptive average pooling,
//! nn.MultiheadAttention, and the 2 x 2 patch split of an image.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

use crate::eval::nets::Conv;
use crate::weights::TensorFile;
use crate::{Error, Result};

/// Python's `round` (halves to even), which the reference uses for its pooling sizes.
pub fn round_half_even(x: f64) -> usize {
    let f = x.floor();
    let r = if x - f == 0.5 {
        if (f as i64) % 2 == 0 {
            f
        } else {
            f + 1.0
        }
    } else {
        x.round()
    };
    r.max(0.0) as usize
}

/// The out x in matrix of PyTorch's bilinear interpolation (align_corners=False, no
/// antialias): source coordinate `(dst + 0.5) * in / out - 0.5`, clamped at 0.
fn bilinear_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    let scale = input as f32 / output as f32;
    for o in 0..output {
        let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        m[o * input + i0] += l0;
        m[o * input + i1] += l1;
    }
    m
}

/// The out x in matrix of adaptive average pooling: output cell `o` averages the inputs
/// `floor(o * in / out) .. ceil((o + 1) * in / out)`.
fn adaptive_pool_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let start = (o * input) / output;
        let end = ((o + 1) * input).div_ceil(output);
        let n = (end - start) as f32;
        for i in start..end {
            m[o * input + i] = 1.0 / n;
        }
    }
    m
}

/// Apply per-axis matrices (out, in) to the last two dimensions of (N, C, H, W).
fn apply_axes(x: &Tensor, mh: Vec<f32>, mw: Vec<f32>, (oh, ow): (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dev = x.device();
    let mw = Tensor::from_vec(mw, (ow, w), dev)?.t()?.contiguous()?;
    let mh = Tensor::from_vec(mh, (oh, h), dev)?;
    let y = x.contiguous()?.broadcast_matmul(&mw)?; // (N, C, H, ow)
    Ok(mh.broadcast_matmul(&y)?) // (N, C, oh, ow)
}

/// `F.interpolate(x, size=(oh, ow), mode="bilinear")` (align_corners=False). The same size is
/// the identity.
pub fn bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    apply_axes(x, bilinear_matrix(h, oh), bilinear_matrix(w, ow), (oh, ow))
}

/// `F.adaptive_avg_pool2d(x, (oh, ow))`.
pub fn adaptive_avg_pool(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if oh == 0 || ow == 0 {
        return Err(Error::invalid("BEN2 pooling", format!("a {h}x{w} feature map pools to {oh}x{ow}: the input image is too small")));
    }
    apply_axes(x, adaptive_pool_matrix(h, oh), adaptive_pool_matrix(w, ow), (oh, ow))
}

/// `F.interpolate(x, size=(oh, ow), mode="nearest")`: source index `floor(dst * in / out)`.
pub fn nearest(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let idx = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let v: Vec<u32> = (0..output).map(|o| ((o as f32 * scale).floor() as usize).min(input - 1) as u32).collect();
        Ok(Tensor::from_vec(v, output, x.device())?)
    };
    Ok(x.index_select(&idx(h, oh)?, 2)?.index_select(&idx(w, ow)?, 3)?)
}

/// `b c (hg h) (wg w) -> (hg wg b) c h w` with hg = wg = 2: the four quarters of each image,
/// top-left, top-right, bottom-left, bottom-right (image index fastest).
pub fn image_to_patches(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::invalid("BEN2 patches", format!("a {h}x{w} map does not split into 2 x 2 quarters")));
    }
    let (h2, w2) = (h / 2, w / 2);
    let parts = [(0, 0), (0, w2), (h2, 0), (h2, w2)]
        .iter()
        .map(|&(r, c)| Ok(x.narrow(2, r, h2)?.narrow(3, c, w2)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// The inverse of [`image_to_patches`]: `(hg wg b) c h w -> b c (hg h) (wg w)`.
pub fn patches_to_image(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n % 4 != 0 {
        return Err(Error::invalid("BEN2 patches", format!("{n} patches are not groups of 4")));
    }
    let b = n / 4;
    let q = |i: usize| x.narrow(0, i * b, b);
    let top = Tensor::cat(&[&q(0)?, &q(1)?], 3)?;
    let bottom = Tensor::cat(&[&q(2)?, &q(3)?], 3)?;
    Ok(Tensor::cat(&[&top, &bottom], 2)?)
}

/// `nn.InstanceNorm2d` (no affine, eps 1e-5, biased variance over H x W).
pub fn instance_norm(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let flat = x.reshape((n, c, h * w))?;
    let mean = flat.mean_keepdim(D::Minus1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?.reshape((n, c, h, w))?)
}

/// A 3x3 conv (padding 1) with its bias.
pub(crate) fn conv3(f: &TensorFile, prefix: &str, cin: usize, cout: usize) -> Result<Conv> {
    Conv::load(f, prefix, (cin, cout), (3, 3), 1, (1, 1), true)
}

/// The output channels of the conv `{prefix}weight` (cout, cin, kh, kw), read from the file.
pub(crate) fn conv_out(f: &TensorFile, prefix: &str) -> Result<usize> {
    let key = format!("{prefix}weight");
    match f.tensors.get(&key) {
        Some(t) if t.rank() == 4 => Ok(t.dim(0)?),
        Some(t) => Err(Error::bad_file(&f.path, format!("`{key}` has shape {:?}, expected a conv weight (4 dims)", t.dims()))),
        None => Err(Error::MissingKey { path: f.path.clone(), key, expected: vec![] }),
    }
}

/// Conv 3x3, InstanceNorm, GELU (erf): the reference's `make_cbr` / `make_cbg`, keys
/// `{prefix}0.weight`, `{prefix}0.bias`.
pub struct Cbr {
    conv: Conv,
}

impl Cbr {
    pub fn load(f: &TensorFile, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self { conv: conv3(f, &format!("{prefix}0."), cin, cout)? })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(instance_norm(&self.conv.forward(x)?)?.gelu_erf()?)
    }
}

/// `nn.MultiheadAttention` in inference (no dropout, no masks): `in_proj_weight` (3E, E),
/// `in_proj_bias`, `out_proj`.
pub struct Mha {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    out: Linear,
    heads: usize,
}

impl Mha {
    pub fn load(f: &TensorFile, prefix: &str, e: usize, heads: usize) -> Result<Self> {
        if heads == 0 || e % heads != 0 {
            return Err(Error::invalid("BEN2 attention heads", format!("{heads} heads do not divide width {e}")));
        }
        let w = f.get(&format!("{prefix}in_proj_weight"), &[3 * e, e])?.to_dtype(DType::F32)?;
        let b = f.get(&format!("{prefix}in_proj_bias"), &[3 * e])?.to_dtype(DType::F32)?;
        let part = |i: usize| -> Result<Linear> { Ok(Linear::new(w.narrow(0, i * e, e)?, Some(b.narrow(0, i * e, e)?))) };
        Ok(Self { wq: part(0)?, wk: part(1)?, wv: part(2)?, out: crate::eval::nets::linear(f, &format!("{prefix}out_proj."), e, e)?, heads })
    }

    /// q (B, Lq, E), k and v (B, Lk, E) -> (B, Lq, E).
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, lq, e) = q.dims3()?;
        let lk = k.dim(1)?;
        let (nh, hd) = (self.heads, e / self.heads);
        let split = |t: Tensor, l: usize| -> Result<Tensor> { Ok(t.reshape((b, l, nh, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = split((self.wq.forward(q)? * (1.0 / (hd as f64).sqrt()))?, lq)?;
        let k = split(self.wk.forward(k)?, lk)?;
        let v = split(self.wv.forward(v)?, lk)?;
        let attn = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, lq, e))?;
        Ok(self.out.forward(&y)?)
    }
}

/// `LayerNorm(E)` with eps 1e-5, as `nn.LayerNorm` defaults.
pub(crate) fn norm(f: &TensorFile, prefix: &str, d: usize) -> Result<LayerNorm> {
    crate::eval::nets::layer_norm(f, prefix, d, 1e-5)
}

/// The DETR sine position embedding with `normalize=True` (scale 2 pi, temperature 10000) of
/// an h x w grid, as (h * w, 2 * feats) rows in row-major order: the first `feats` channels
/// encode the row, the rest the column; channel 2k is sin(pos / t_k), 2k+1 cos(pos / t_k)
/// with t_k = 10000^(2k / feats).
pub fn sine_position(h: usize, w: usize, feats: usize, dev: &Device) -> Result<Tensor> {
    let scale = 2.0 * std::f32::consts::PI;
    let eps = 1e-6f32;
    let dim_t: Vec<f32> = (0..feats).map(|i| 10000f32.powf((2 * (i / 2)) as f32 / feats as f32)).collect();
    let mut out = Vec::with_capacity(h * w * 2 * feats);
    let enc = |pos: f32, out: &mut Vec<f32>| {
        for (i, t) in dim_t.iter().enumerate() {
            let a = pos / t;
            out.push(if i % 2 == 0 { a.sin() } else { a.cos() });
        }
    };
    for y in 0..h {
        for x in 0..w {
            let ye = ((y + 1) as f32 - 0.5) / (h as f32 + eps) * scale;
            let xe = ((x + 1) as f32 - 0.5) / (w as f32 + eps) * scale;
            enc(ye, &mut out);
            enc(xe, &mut out);
        }
    }
    Ok(Tensor::from_vec(out, (h * w, 2 * feats), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding_and_pool_bounds() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(1.49), 1);
        // 5 -> 3: cells [0,2), [1,4), [3,5)
        let m = adaptive_pool_matrix(5, 3);
        assert_eq!(&m[0..5], &[0.5, 0.5, 0.0, 0.0, 0.0]);
        assert!((m[5 + 1] - 1.0 / 3.0).abs() < 1e-7 && m[5] == 0.0 && m[5 + 4] == 0.0);
        assert_eq!(&m[10..15], &[0.0, 0.0, 0.0, 0.5, 0.5]);
    }

    #[test]
    fn bilinear_halves_average_pairs_and_patches_roundtrip() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 16.0, &dev)?.reshape((1, 1, 4, 4))?;
        let y = bilinear(&x, 2, 2)?.flatten_all()?.to_vec1::<f32>()?;
        // rows (0,1) and cols (0,1) average: (0+1+4+5)/4
        assert_eq!(y, vec![2.5, 4.5, 10.5, 12.5]);
        let up = bilinear(&Tensor::new(&[[[[0f32, 4.0]]]], &dev)?, 1, 4)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(up, vec![0.0, 1.0, 3.0, 4.0]);
        let p = image_to_patches(&x)?;
        assert_eq!(p.dims(), &[4, 1, 2, 2]);
        assert_eq!(p.get(1)?.flatten_all()?.to_vec1::<f32>()?, vec![2.0, 3.0, 6.0, 7.0]);
        let back = patches_to_image(&p)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        let n = nearest(&x, 2, 2)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(n, vec![0.0, 2.0, 8.0, 10.0]);
        Ok(())
    }
}

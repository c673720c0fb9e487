//! 2D rotary position embedding as LlamaGen computes it (the GPT's; the fused kernel with its
//! backward pass is [`super::rope_interleaved`]).
//!
//! `head_dim / 2` interleaved pairs `(x[2k], x[2k+1])`; with `q = head_dim / 4` frequencies
//! `f_k = 1 / base^(2k / (head_dim / 2))`, pairs `0..q` rotate by `row * f_k` and pairs
//! `q..2q` by `col * f_k`. Cells come from the [`Layout`](crate::layout::Layout);
//! [`RopeCell::Zero`] is LlamaGen's caption quirk (cos = sin = 0, zeroing q and k), kept for
//! checkpoint compatibility.

use crate::error::Result;
use crate::layout::RopeCell;
use candle_core::{Device, Tensor};

/// cos and sin tables, each (positions, head_dim / 2).
pub fn tables(cells: &[RopeCell], head_dim: usize, base: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let quarter = half / 2;
    let freqs: Vec<f64> = (0..quarter).map(|k| 1.0 / base.powf((2 * k) as f64 / half as f64)).collect();
    let mut cos = Vec::with_capacity(cells.len() * half);
    let mut sin = Vec::with_capacity(cells.len() * half);
    for cell in cells {
        match *cell {
            RopeCell::Zero => {
                cos.extend(std::iter::repeat_n(0f32, half));
                sin.extend(std::iter::repeat_n(0f32, half));
            }
            RopeCell::Cell(r, c) => {
                for pos in [r, c] {
                    for f in &freqs {
                        let a = pos as f64 * f;
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
    }
    let n = cells.len();
    Ok((Tensor::from_vec(cos, (n, half), device)?, Tensor::from_vec(sin, (n, half), device)?))
}

/// Rotate `x` (B, H, S, head_dim) by the tables (S, head_dim / 2). `differentiable` selects
/// a version that passes gradients ([`crate::nn::rope_interleaved`] on the CPU, an
/// elementary-op composition elsewhere) instead of candle's fused kernel.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<Tensor> {
    if !differentiable {
        return Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)?);
    }
    match super::rope_interleaved(x, cos, sin)? {
        Some(y) => Ok(y),
        None => apply_composed(x, cos, sin),
    }
}

/// The rotation from elementary ops (any device; candle derives the gradient).
pub(crate) fn apply_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    let xs = x.reshape((b, h, s, d / 2, 2))?;
    let x0 = xs.narrow(4, 0, 1)?;
    let x1 = xs.narrow(4, 1, 1)?;
    let c = cos.reshape((s, d / 2, 1))?;
    let sn = sin.reshape((s, d / 2, 1))?;
    let o0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&sn)?)?;
    let o1 = (x0.broadcast_mul(&sn)? + x1.broadcast_mul(&c)?)?;
    Ok(Tensor::cat(&[o0, o1], 4)?.reshape((b, h, s, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_and_composed_agree_and_quirk_zeroes() {
        let dev = Device::Cpu;
        let cells = [RopeCell::Zero, RopeCell::Cell(0, 0), RopeCell::Cell(3, 5)];
        let (c, s) = tables(&cells, 8, 10000.0, &dev).unwrap();
        // Pair 0 rotates by row*1, pair 2 by col*1 (f_0 = 1).
        let cv = c.to_vec2::<f32>().unwrap();
        assert!((cv[2][0] - 3f32.cos()).abs() < 1e-6 && (cv[2][2] - 5f32.cos()).abs() < 1e-6);
        assert!((cv[2][1] - (3.0f64 * 0.01).cos() as f32).abs() < 1e-6);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 3, 8), &dev).unwrap();
        let a = apply(&x, &c, &s, true).unwrap();
        let b = apply(&x, &c, &s, false).unwrap();
        let diff = (a.clone() - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        let zero = a.narrow(2, 0, 1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(zero, 0.0);
        let ident = (a.narrow(2, 1, 1).unwrap() - x.narrow(2, 1, 1).unwrap()).unwrap();
        assert!(ident.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-7);
    }
}

//! Cross-entropy over a large vocabulary as one fused operation with a backward pass.
//!
//! `candle_nn::loss::cross_entropy` composes log-softmax from elementary ops: about ten passes
//! over the (positions, vocab) logits forward and backward, each allocating a tensor of that
//! size. Over a 16384-entry codebook that cost more than the output head's matmul. Here the
//! forward is one pass per row (max, log-sum-exp, the target's logit) and the backward one
//! pass writing `(softmax - onehot) * grad / N`. Same value and gradient as the composed op
//! (a test checks both); on devices other than the CPU, or for dtypes other than f32, the
//! composed op is used.
//!
//! [`head_cross_entropy`] goes one step further for the output head: the logits `h @ w^T`,
//! the per-row losses and `softmax - onehot` in one op, so the (positions, vocab) matrix is
//! written once and its backward pass is just the head's two matrix products.

use crate::error::{Error, Result};
use crate::nn::{mm, par_rows, rows_of};
use crate::vmath::{exp_shifted_scaled, log_sum_exp, softmax_in_place_lse};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Mean cross-entropy of `logits` (N, V) against `targets` (N,) u32 class ids: a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let t = class_ids(targets, n, v, "cross-entropy")?;
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        return Ok(candle_nn::loss::cross_entropy(logits, targets)?);
    }
    Ok(logits.contiguous()?.apply_op1(FusedCe { targets: t, lse: Mutex::new(Vec::new()) })?)
}

/// Class ids as a host vector, each checked against the vocabulary size `v`.
fn class_ids(targets: &Tensor, n: usize, v: usize, what: &str) -> Result<Vec<u32>> {
    if targets.dims() != [n] {
        return Err(Error::invalid(what, format!("targets of shape {:?}, expected [{n}]", targets.dims())));
    }
    let t = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        return Err(Error::invalid(what, format!("class {bad} outside the vocabulary of {v}")));
    }
    Ok(t)
}

/// Per-row cross-entropy of the output head's logits `h @ w^T` against `targets`: `h` (N, D)
/// features, `w` (V, D) head weight, `targets` (N,) class ids -> (N,) losses, with gradients
/// to `h` and `w`. The logits are never a graph node: on the CPU in f32 one op computes them,
/// turns each row into `softmax - onehot` in place while it is in cache, and its backward pass
/// is two matrix products with the rows scaled by their incoming gradients. Elsewhere the
/// composed ops (matmul, log-softmax, gather).
pub fn head_cross_entropy(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (v, dw) = w.dims2()?;
    if dw != d {
        return Err(Error::invalid("head cross-entropy", format!("features of width {d} for a head weight of shape ({v}, {dw})")));
    }
    let t = class_ids(targets, n, v, "head cross-entropy")?;
    if !h.device().is_cpu() || h.dtype() != DType::F32 || w.dtype() != DType::F32 {
        let logp = candle_nn::ops::log_softmax(&h.matmul(&w.t()?)?, D::Minus1)?;
        let t = Tensor::from_vec(t, (n, 1), h.device())?;
        return Ok(logp.gather(&t, 1)?.squeeze(1)?.neg()?);
    }
    Ok(h.contiguous()?.apply_op2(&w.contiguous()?, HeadCe { targets: t, residual: Mutex::new(None) })?)
}

/// The features (N x D) and head weight (V x D) of the head ops as slices, with N, V and D.
fn head_operands<'a>(sh: &'a CpuStorage, lh: &Layout, sw: &'a CpuStorage, lw: &Layout) -> candle_core::Result<(&'a [f32], &'a [f32], usize, usize, usize)> {
    let (h, d) = rows_of(sh, lh)?;
    let (w, dw) = rows_of(sw, lw)?;
    if dw != d {
        candle_core::bail!("head cross-entropy: features of width {d} for a head of width {dw}");
    }
    Ok((h, w, h.len() / d.max(1), w.len() / d.max(1), d))
}

struct HeadCe {
    targets: Vec<u32>,
    /// `softmax - onehot` (N x V) from the forward pass, for the backward pass.
    residual: Mutex<Option<Arc<Vec<f32>>>>,
}

impl CustomOp2 for HeadCe {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, sh: &CpuStorage, lh: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, w, n, v, d) = head_operands(sh, lh, sw, lw)?;
        if self.targets.len() != n {
            candle_core::bail!("head cross-entropy: {} targets for {n} rows", self.targets.len());
        }
        let mut p = vec![0f32; n * v];
        // logits = h w^T: w^T (D x V) is w read with row stride 1, column stride D.
        mm(n, v, d, &mut p, h, d, 1, w, 1, d)?;
        let mut loss = vec![0f32; n];
        if v > 0 {
            let per = n.div_ceil(candle_core::utils::get_num_threads().max(1)).max(1);
            p.par_chunks_mut(per * v).zip(loss.par_chunks_mut(per)).enumerate().for_each(|(c, (rows, out))| {
                for (i, (row, l)) in rows.chunks_exact_mut(v).zip(out.iter_mut()).enumerate() {
                    let t = self.targets[c * per + i] as usize;
                    let target_logit = row[t];
                    *l = softmax_in_place_lse(row) - target_logit;
                    row[t] -= 1.0;
                }
            });
        }
        *self.residual.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(p));
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(residual) = self.residual.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("head cross-entropy: backward pass before the forward pass");
        };
        let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let h = h.contiguous()?;
        let w = w.contiguous()?;
        let dh = h.apply_op2_no_bwd(&w, &HeadCeGrad { residual: residual.clone(), g: g.clone(), wrt: Wrt::Features })?;
        let dw = h.apply_op2_no_bwd(&w, &HeadCeGrad { residual, g, wrt: Wrt::Weight })?;
        Ok((Some(dh), Some(dw)))
    }
}

enum Wrt {
    Features,
    Weight,
}

/// With `R = softmax - onehot` and row gradients `g`: features `diag(g) R w` (N x D),
/// weight `R^T diag(g) h` (V x D).
struct HeadCeGrad {
    residual: Arc<Vec<f32>>,
    g: Vec<f32>,
    wrt: Wrt,
}

impl CustomOp2 for HeadCeGrad {
    fn name(&self) -> &'static str {
        "head-cross-entropy-grad"
    }

    fn cpu_fwd(&self, sh: &CpuStorage, lh: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, w, n, v, d) = head_operands(sh, lh, sw, lw)?;
        let r = &self.residual[..];
        if r.len() != n * v || self.g.len() != n {
            candle_core::bail!("head cross-entropy grad: {} residuals and {} row gradients for {n} x {v}", r.len(), self.g.len());
        }
        match self.wrt {
            Wrt::Features => {
                let mut dh = vec![0f32; n * d];
                mm(n, d, v, &mut dh, r, v, 1, w, d, 1)?;
                for (row, &gi) in dh.chunks_exact_mut(d.max(1)).zip(&self.g) {
                    row.iter_mut().for_each(|x| *x *= gi);
                }
                Ok((CpuStorage::F32(dh), lh.shape().clone()))
            }
            Wrt::Weight => {
                let mut hs = h.to_vec();
                for (row, &gi) in hs.chunks_exact_mut(d.max(1)).zip(&self.g) {
                    row.iter_mut().for_each(|x| *x *= gi);
                }
                // R^T (V x N) is R read with row stride 1, column stride V.
                let mut dw = vec![0f32; v * d];
                mm(v, d, n, &mut dw, r, 1, v, &hs, d, 1)?;
                Ok((CpuStorage::F32(dw), lw.shape().clone()))
            }
        }
    }
}

struct FusedCe {
    targets: Vec<u32>,
    /// Per-row log-sum-exp from the forward pass, reused by the backward pass.
    lse: Mutex<Vec<f32>>,
}

/// Rows of a (N, V) f32 CPU tensor as one contiguous slice.
fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (n, v) = l.shape().dims2()?;
    Ok((rows_of(s, l)?.0, n, v))
}

impl CustomOp1 for FusedCe {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, n, v) = rows(s, l)?;
        let mut z = vec![0f32; n];
        par_rows(data, v, &mut z, 1, |_, d, o| {
            for (row, zi) in d.chunks_exact(v).zip(o.iter_mut()) {
                *zi = log_sum_exp(row);
            }
        });
        let total: f64 = z.iter().enumerate().map(|(r, &zr)| (zr - data[r * v + self.targets[r] as usize]) as f64).sum();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = z;
        Ok((CpuStorage::F32(vec![(total / n.max(1) as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let n = arg.dim(0)?;
        let lse = std::mem::take(&mut *self.lse.lock().unwrap_or_else(|e| e.into_inner()));
        let op = FusedCeGrad { targets: self.targets.clone(), lse, scale: g / n.max(1) as f32 };
        Ok(Some(arg.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

struct FusedCeGrad {
    targets: Vec<u32>,
    /// The forward pass's per-row log-sum-exp (empty: recompute).
    lse: Vec<f32>,
    scale: f32,
}

impl CustomOp1 for FusedCeGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, n, v) = rows(s, l)?;
        let mut out = vec![0f32; n * v];
        let have = self.lse.len() == n;
        par_rows(data, v, &mut out, v, |r0, d, o| {
            for (i, (row, o)) in d.chunks_exact(v).zip(o.chunks_exact_mut(v)).enumerate() {
                let r = r0 + i;
                let z = if have { self.lse[r] } else { log_sum_exp(row) };
                exp_shifted_scaled(row, z, self.scale, o);
                o[self.targets[r] as usize] -= self.scale;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_composed_value_and_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (7, 50), &dev).unwrap())).unwrap();
        let t = Tensor::new(&[0u32, 49, 3, 3, 17, 25, 8], &dev).unwrap();
        // A downstream factor, so the incoming gradient is not 1.
        let a = (cross_entropy(x.as_tensor(), &t).unwrap() * 2.5).unwrap();
        let b = (candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap() * 2.5).unwrap();
        let (va, vb) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((va - vb).abs() < 1e-5, "{va} vs {vb}");
        let ga = a.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let gb = b.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d = (ga - gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
        assert!(cross_entropy(x.as_tensor(), &Tensor::new(&[50u32, 0, 0, 0, 0, 0, 0], &dev).unwrap()).is_err());
        assert!(cross_entropy(x.as_tensor(), &Tensor::new(&[1u32], &dev).unwrap()).is_err());
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn head_cross_entropy_matches_composed_value_and_gradients() {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 12), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.7, (40, 12), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[0u32, 39, 3, 3, 17, 25, 8, 1, 30], &dev).unwrap();
        // Rows weighted differently downstream, so each row's incoming gradient differs.
        let weights = Tensor::new(&[1f32, 0.5, 2.0, 0.0, 3.0, 1.0, 0.25, 1.5, 0.75], &dev).unwrap();
        let fused = head_cross_entropy(h.as_tensor(), w.as_tensor(), &t).unwrap();
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let composed = logp.gather(&t.reshape((9, 1)).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap();
        assert_eq!(fused.dims(), &[9]);
        assert!(max_diff(&fused, &composed) < 1e-5);
        // The mean of the rows is the plain cross-entropy.
        let ce = candle_nn::loss::cross_entropy(&logits, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!((fused.mean_all().unwrap().to_scalar::<f32>().unwrap() - ce).abs() < 1e-5);
        let ga = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&h, &w] {
            let (a, b) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            assert_eq!(a.dims(), v.as_tensor().dims());
            assert!(max_diff(a, b) < 1e-5, "{}", max_diff(a, b));
        }
    }

    #[test]
    fn head_cross_entropy_refuses_bad_input() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let err = head_cross_entropy(&h, &w, &Tensor::new(&[0u32, 5, 1], &dev).unwrap()).unwrap_err().to_string();
        assert!(err.contains("class 5") && err.contains("vocabulary of 5"), "{err}");
        assert!(head_cross_entropy(&h, &w, &Tensor::new(&[0u32, 1], &dev).unwrap()).is_err());
        let narrow = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let err = head_cross_entropy(&h, &narrow, &Tensor::new(&[0u32, 1, 2], &dev).unwrap()).unwrap_err().to_string();
        assert!(err.contains("width 4"), "{err}");
    }
}

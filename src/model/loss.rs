//! Cross-entropy over a large vocabulary as one fused operation with a backward pass.
//!
//! `candle_nn::loss::cross_entropy` composes log-softmax from elementary ops: about ten passes
//! over the (positions, vocab) logits forward and backward, each allocating a tensor of that
//! size. Over a 16384-entry codebook that cost more than the output head's matmul. Here the
//! forward is one pass per row (max, log-sum-exp, the target's logit) and the backward one
//! pass writing `(softmax - onehot) * grad / N`. Same value and gradient as the composed op
//! (a test checks both); on devices other than the CPU, or for dtypes other than f32, the
//! composed op is used.

use crate::error::{Error, Result};
use crate::nn::{par_rows, rows_of};
use crate::vmath::{exp_shifted_scaled, log_sum_exp};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::Mutex;

/// Mean cross-entropy of `logits` (N, V) against `targets` (N,) u32 class ids: a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(Error::invalid("cross-entropy targets", format!("shape {:?}, expected [{n}]", targets.dims())));
    }
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        return Ok(candle_nn::loss::cross_entropy(logits, targets)?);
    }
    let t = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        return Err(Error::invalid("cross-entropy targets", format!("class {bad} outside the vocabulary of {v}")));
    }
    Ok(logits.contiguous()?.apply_op1(FusedCe { targets: t, lse: Mutex::new(Vec::new()) })?)
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
}

//! Differentiable building blocks shared by the trainable models.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` (and the `RmsNorm`/`LayerNorm`
//! modules built on them) and the fused RoPE kernels compute no gradient. Everything on a
//! trainable path uses the compositions here instead; frozen encoders may use the fused ops.

use crate::error::Result;
use candle_core::{DType, Tensor, Var, D};
use candle_nn::VarBuilder;

/// Softmax over the last dimension, composed of elementary ops so it passes gradients.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// RMSNorm as LlamaGen computes it: in f32, `x * rsqrt(mean(x^2) + eps) * weight`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        Ok(y.broadcast_mul(&self.weight.to_dtype(dtype)?)?)
    }
}

/// LayerNorm over the last dimension with weight and optional bias, differentiable.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = if bias {
            Some(vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        let y = y.broadcast_mul(&self.weight.to_dtype(dtype)?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(dtype)?)?,
            None => y,
        })
    }
}

/// Names of the variables in `vars` whose gradient under `grads` is missing or all zero.
/// Tests use it to prove that every trainable parameter learns.
pub fn vars_without_grad(
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, var) in vars {
        match grads.get(var.as_tensor()) {
            None => out.push(name.clone()),
            Some(g) => {
                let m = g.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if m == 0.0 || !m.is_finite() {
                    out.push(name.clone());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// All variables of a `VarMap`, sorted by name.
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn rms_norm_values_and_grad() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let n = RmsNorm::new(2, 0.0, vb.pp("n")).unwrap();
        let x = Var::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
        let y = n.forward(x.as_tensor()).unwrap();
        // rms = sqrt((9 + 16) / 2)
        let r = (12.5f32).sqrt();
        let got = y.to_vec2::<f32>().unwrap();
        assert!((got[0][0] - 3.0 / r).abs() < 1e-6 && (got[0][1] - 4.0 / r).abs() < 1e-6);
        let loss = (y * Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        let vars = named_vars(&vm);
        assert!(vars_without_grad(&vars, &g).unwrap().is_empty());
    }

    #[test]
    fn layer_norm_zero_mean_unit_var() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let n = LayerNorm::new(4, 1e-5, true, vb).unwrap();
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let y = n.forward(&x).unwrap();
        let m = y.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(m.abs() < 1e-6);
        let v = y.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 1.0).abs() < 1e-3);
    }
}

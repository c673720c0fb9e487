//! The distillation head of EditAR/TokenAR (`alignment`): a Conv2d(dim, out, k=2, s=2) on the
//! final-norm features of the positions that predict the target image, laid out on the code
//! grid (B, dim, h, w), giving (B, h*w/4, out) to compare with a frozen image encoder's patch
//! features (DINOv2-base in the reference: out = 768, a 32x32 code grid against its 16x16
//! patches). Training only: generation never reads it, but checkpoints carry it.
//!
//! Key names: `alignment.weight` / `alignment.bias`. The reference's multi-encoder variant
//! (`distill_mode` a list of several encoders) stores an `nn.ModuleList`,
//! `alignment.0.weight`, `alignment.1.weight`, ...; [`normalize_keys`] maps the first head
//! (the first encoder of the list, DINOv2 in the reference's default) to the single-head names
//! and drops the others.

use crate::error::{Error, Result};
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use std::collections::HashMap;

/// The `alignment` head: weight (out, dim, 2, 2), bias (out).
pub struct Alignment {
    weight: Tensor,
    bias: Tensor,
}

impl Alignment {
    /// Create (or fetch) the head's variables under `vb` (the `alignment` prefix): weight
    /// N(0, 0.02), bias 0.
    pub fn new(dim: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out, dim, 2, 2), "weight", Init::Randn { mean: 0.0, stdev: 0.02 })?;
        let bias = vb.get_with_hints(out, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }

    /// The head on target features (B, h*w, dim) of an (h, w) code grid: (B, h*w/4, out), in
    /// raster order of the (h/2, w/2) output grid. Differentiable (a plain convolution).
    pub fn forward(&self, target_features: &Tensor, (gh, gw): (usize, usize)) -> Result<Tensor> {
        let (b, n, d) = target_features.dims3()?;
        if n != gh * gw || gh % 2 != 0 || gw % 2 != 0 {
            return Err(Error::invalid("alignment head input", format!("{n} target features for a {gh}x{gw} code grid (an even grid is needed)")));
        }
        let x = target_features.transpose(1, 2)?.reshape((b, d, gh, gw))?.contiguous()?;
        let y = x.conv2d(&self.weight, 0, 2, 1, 1)?.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        Ok(y.flatten_from(2)?.transpose(1, 2)?)
    }

    /// Output width (768 for DINOv2-base).
    pub fn out_dim(&self) -> usize {
        self.bias.dims1().unwrap_or(0)
    }
}

/// Map the reference's `nn.ModuleList` keys (`alignment.0.weight`, `alignment.0.bias`) to the
/// single-head names when the file has no `alignment.weight`, and drop the further heads
/// (`alignment.1.*`, ...: heads for other encoders, e.g. CLIP, which this project does not
/// train). Returns the dropped keys.
pub fn normalize_keys(tensors: &mut HashMap<String, Tensor>) -> Vec<String> {
    if tensors.contains_key("alignment.weight") || !tensors.contains_key("alignment.0.weight") {
        return Vec::new();
    }
    let listed: Vec<String> = tensors.keys().filter(|k| k.starts_with("alignment.") && k.split('.').nth(1).is_some_and(|i| i.parse::<usize>().is_ok())).cloned().collect();
    let mut dropped = Vec::new();
    for k in listed {
        if let Some(t) = tensors.remove(&k) {
            match k.strip_prefix("alignment.0.") {
                Some(rest) => {
                    tensors.insert(format!("alignment.{rest}"), t);
                }
                None => dropped.push(k),
            }
        }
    }
    dropped.sort();
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn module_list_keys_map_to_the_single_head() {
        let dev = Device::Cpu;
        let t = |n: usize| Tensor::zeros(n, DType::F32, &dev).unwrap();
        let mut m: HashMap<String, Tensor> = [("alignment.0.weight", 4), ("alignment.0.bias", 2), ("alignment.1.weight", 3), ("alignment.1.bias", 1), ("norm.weight", 5)]
            .into_iter()
            .map(|(k, n)| (k.to_string(), t(n)))
            .collect();
        assert_eq!(normalize_keys(&mut m), vec!["alignment.1.bias".to_string(), "alignment.1.weight".to_string()]);
        let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, vec!["alignment.bias", "alignment.weight", "norm.weight"]);
        assert_eq!(m["alignment.weight"].dims(), &[4]);
        // The single-head names are left as they are.
        assert!(normalize_keys(&mut m).is_empty());
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn head_is_a_2x2_stride_2_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let head = Alignment::new(2, 3, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        // weight[o, c, i, j] = o + 1 on channel 0, 0 on channel 1; bias 0.5
        for (name, v) in vm.data().lock().unwrap().iter() {
            if name == "weight" {
                let w: Vec<f32> = (0..3).flat_map(|o| (0..2).flat_map(move |c| std::iter::repeat_n(if c == 0 { (o + 1) as f32 } else { 0.0 }, 4))).collect();
                v.set(&Tensor::from_vec(w, (3, 2, 2, 2), &dev)?)?;
            } else {
                v.set(&Tensor::full(0.5f32, 3, &dev)?)?;
            }
        }
        // 2x4 grid, channel 0 = cell index, channel 1 = 100
        let f: Vec<f32> = (0..8).flat_map(|i| [i as f32, 100.0]).collect();
        let y = head.forward(&Tensor::from_vec(f, (1, 8, 2), &dev)?, (2, 4))?;
        assert_eq!(y.dims(), &[1, 2, 3]);
        // output cell 0 sums cells 0, 1, 4, 5 (= 10); cell 1 sums 2, 3, 6, 7 (= 18)
        let v = y.to_vec3::<f32>()?;
        assert_eq!(v[0][0], vec![10.5, 20.5, 30.5]);
        assert_eq!(v[0][1], vec![18.5, 36.5, 54.5]);
        assert_eq!(head.out_dim(), 3);
        assert!(head.forward(&Tensor::zeros((1, 6, 2), DType::F32, &dev)?, (2, 3)).is_err());
        Ok(())
    }
}

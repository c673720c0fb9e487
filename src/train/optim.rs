//! AdamW with the reference recipe (weight decay only on parameters with two or more
//! dimensions), global-norm gradient clipping and the learning-rate schedule.
//!
//! The update follows PyTorch's `torch.optim.AdamW`: `p *= 1 - lr * wd` (decayed parameters
//! only), `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`. Parameters without a gradient
//! are skipped entirely (as PyTorch skips `grad is None`).

use crate::error::{Error, Result};
use crate::nn::rows_of;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout, Shape, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// The LlamaGen / EditAR / TokenAR recipe.
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over a fixed list of named variables.
pub struct AdamW {
    params: AdamWParams,
    slots: Vec<Slot>,
    step: u64,
}

/// The per-step constants of one update.
struct Coefs {
    decay: f64,
    b1: f64,
    b2: f64,
    step: f64,
    inv_bc2: f64,
    eps: f64,
}

/// One slot's update with tensor ops (any device and dtype; state kept in f32).
fn update_tensor(s: &mut Slot, g: &Tensor, k: &Coefs) -> Result<()> {
    let dtype = s.var.dtype();
    let g = g.to_dtype(DType::F32)?;
    let mut theta = s.var.as_tensor().to_dtype(DType::F32)?;
    if s.decay {
        theta = theta.affine(k.decay, 0.0)?;
    }
    s.m = (s.m.affine(k.b1, 0.0)? + g.affine(1.0 - k.b1, 0.0)?)?;
    s.v = (s.v.affine(k.b2, 0.0)? + g.sqr()?.affine(1.0 - k.b2, 0.0)?)?;
    let denom = s.v.affine(k.inv_bc2, 0.0)?.sqrt()?.affine(1.0, k.eps)?;
    let theta = (theta - s.m.affine(k.step, 0.0)?.div(&denom)?)?;
    s.var.set(&theta.to_dtype(dtype)?)?;
    Ok(())
}

/// The same update as [`update_tensor`] in place on f32 CPU memory: the two moments, then the
/// parameter, each one element-wise pass reading the gradient and the state where they lie
/// (copying parameter, gradient and moments out and back cost more than the update itself).
fn update_cpu(s: &mut Slot, g: &Tensor, scale: f32, k: &Coefs) -> Result<()> {
    let g = g.contiguous()?;
    s.m.inplace_op2(&g, &Moment { keep: k.b1 as f32, scale, square: false })?;
    s.v.inplace_op2(&g, &Moment { keep: k.b2 as f32, scale, square: true })?;
    let step = ParamStep {
        decay: if s.decay { k.decay as f32 } else { 1.0 },
        step: k.step as f32,
        inv_bc2: k.inv_bc2 as f32,
        eps: k.eps as f32,
    };
    s.var.as_tensor().inplace_op3(&s.m, &s.v, &step)?;
    Ok(())
}

/// `state = keep * state + (1 - keep) * x` with `x = scale * g` (or its square when
/// `square`), in place.
struct Moment {
    keep: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let state = crate::nn::rows_of_mut(s1, l1)?;
        let g = rows_of(s2, l2)?.0;
        if state.len() != g.len() {
            candle_core::bail!("AdamW: {} state entries for a gradient of {}", state.len(), g.len());
        }
        let (keep, add, scale) = (self.keep, 1.0 - self.keep, self.scale);
        if self.square {
            state.iter_mut().zip(g).for_each(|(x, &gi)| *x = keep * *x + add * ((gi * scale) * (gi * scale)));
        } else {
            state.iter_mut().zip(g).for_each(|(x, &gi)| *x = keep * *x + add * (gi * scale));
        }
        Ok(())
    }
}

/// `p = p * decay - step * m / (sqrt(v * inv_bc2) + eps)`, in place.
struct ParamStep {
    decay: f32,
    step: f32,
    inv_bc2: f32,
    eps: f32,
}

impl InplaceOp3 for ParamStep {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<()> {
        let p = crate::nn::rows_of_mut(s1, l1)?;
        let (m, v) = (rows_of(s2, l2)?.0, rows_of(s3, l3)?.0);
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("AdamW: {} parameters for moments of {} and {}", p.len(), m.len(), v.len());
        }
        for ((x, &mi), &vi) in p.iter_mut().zip(m).zip(v) {
            *x = *x * self.decay - self.step * mi / ((vi * self.inv_bc2).sqrt() + self.eps);
        }
        Ok(())
    }
}

/// Key prefixes of the optimiser state inside a checkpoint.
pub const M_PREFIX: &str = "optim.m.";
pub const V_PREFIX: &str = "optim.v.";
/// Metadata key of the optimiser step count.
pub const STEP_KEY: &str = "optim.step";

impl AdamW {
    /// `vars`: (name, variable); names must be unique (they key the saved state).
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                return Err(Error::invalid("optimiser variables", format!("`{name}` appears twice")));
            }
            let t = var.as_tensor();
            let decay = t.rank() >= 2;
            // Two buffers: the CPU update writes each in place.
            let m = t.zeros_like()?.to_dtype(DType::F32)?;
            let v = t.zeros_like()?.to_dtype(DType::F32)?;
            slots.push(Slot { name, var, m, v, decay });
        }
        Ok(Self { params, slots, step: 0 })
    }

    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    pub fn lr(&self) -> f64 {
        self.params.lr
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// (name, variable) in the order given to [`AdamW::new`].
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.slots.iter().map(|s| (s.name.clone(), s.var.clone())).collect()
    }

    /// Names of the variables that receive weight decay (two or more dimensions).
    pub fn decayed(&self) -> Vec<&str> {
        self.slots.iter().filter(|s| s.decay).map(|s| s.name.as_str()).collect()
    }

    /// Apply one update from `grads` (gradients keyed by the variables' tensors).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// Apply one update from `grads` multiplied by `grad_scale` (the factor of global-norm
    /// clipping, [`clip_coef`], applied inside the update instead of as a pass of its own).
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params.clone();
        let t = self.step as i32;
        let k = Coefs {
            decay: 1.0 - p.lr * p.weight_decay,
            b1: p.beta1,
            b2: p.beta2,
            // lr / (1 - b1^t) and 1 / (1 - b2^t): the bias corrections folded into two factors.
            step: p.lr / (1.0 - p.beta1.powi(t)),
            inv_bc2: 1.0 / (1.0 - p.beta2.powi(t)),
            eps: p.eps,
        };
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            if s.var.device().is_cpu() && s.var.dtype() == DType::F32 && g.dtype() == DType::F32 {
                update_cpu(s, g, grad_scale as f32, &k)?;
            } else if grad_scale != 1.0 {
                update_tensor(s, &g.affine(grad_scale, 0.0)?, &k)?;
            } else {
                update_tensor(s, g, &k)?;
            }
        }
        Ok(())
    }

    /// The state to save: `optim.m.<name>`, `optim.v.<name>` tensors and the step count. The
    /// tensors are handles to the live state, which the next [`step`](Self::step) overwrites
    /// in place on the CPU: write them out before stepping again.
    pub fn state(&self) -> (HashMap<String, Tensor>, BTreeMap<String, String>) {
        let mut t = HashMap::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            t.insert(format!("{M_PREFIX}{}", s.name), s.m.clone());
            t.insert(format!("{V_PREFIX}{}", s.name), s.v.clone());
        }
        (t, BTreeMap::from([(STEP_KEY.to_string(), self.step.to_string())]))
    }

    /// Restore the state written by [`AdamW::state`]; every variable's m and v must be present
    /// with the variable's shape. `source` names the file in errors.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        metadata: &BTreeMap<String, String>,
        source: &std::path::Path,
    ) -> Result<()> {
        let step = metadata
            .get(STEP_KEY)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::bad_file(source, format!("no valid `{STEP_KEY}` in the metadata")))?;
        let mut new = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut pair = Vec::with_capacity(2);
            for prefix in [M_PREFIX, V_PREFIX] {
                let key = format!("{prefix}{}", s.name);
                let shape = s.var.dims().to_vec();
                let t = tensors.get(&key).ok_or_else(|| Error::MissingKey {
                    path: source.to_path_buf(),
                    key: key.clone(),
                    expected: shape.clone(),
                })?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::ShapeMismatch {
                        path: source.to_path_buf(),
                        key,
                        expected: shape,
                        found: t.dims().to_vec(),
                    });
                }
                pair.push(t.to_device(s.var.device())?.to_dtype(DType::F32)?);
            }
            new.push(pair);
        }
        for (s, mut pair) in self.slots.iter_mut().zip(new) {
            s.v = pair.pop().unwrap_or_else(|| unreachable!());
            s.m = pair.pop().unwrap_or_else(|| unreachable!());
        }
        self.step = step;
        Ok(())
    }
}

/// Scale the gradients of `vars` in place so that their global L2 norm is at most `max_norm`
/// (as `torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1).
/// Returns the norm before clipping. A non-finite norm is returned as is and nothing is scaled.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let total = grad_norm(grads, vars)?;
    let coef = clip_coef(total, max_norm);
    if coef < 1.0 {
        for (_, v) in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(total)
}

/// The factor [`clip_grad_norm`] scales the gradients by, for a global norm `total`:
/// `max_norm / (total + 1e-6)` when that is below 1, else 1 (also for a non-finite norm).
/// With [`AdamW::step_scaled`] it clips without a pass over the gradients.
pub fn clip_coef(total: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (total + 1e-6);
    if total.is_finite() && coef < 1.0 {
        coef
    } else {
        1.0
    }
}

/// Global L2 norm of the gradients of `vars` (accumulated in f64).
pub fn grad_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let mut sq = 0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += if g.device().is_cpu() && g.dtype() == DType::F32 {
                // One pass over the gradient where it lies, accumulated in f64 (the tensor path
                // allocates the squares).
                g.contiguous()?.apply_op1_no_bwd(&SumSquares)?.to_scalar::<f64>()?
            } else {
                g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64
            };
        }
    }
    Ok(sq.sqrt())
}

/// The sum of squares of an f32 tensor, accumulated and returned in f64.
struct SumSquares;

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "sum-squares-f64"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = rows_of(s, l)?.0;
        let total = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        Ok((CpuStorage::F64(vec![total]), Shape::from(())))
    }
}

/// Shape of the learning-rate curve after warm-up.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Constant,
    /// Cosine from the base rate down to `min_lr` at `total_steps`.
    Cosine { total_steps: u64, min_lr: f64 },
}

/// Learning rate per optimiser step: linear warm-up over `warmup_steps`, then [`Decay`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
}

impl LrSchedule {
    pub fn constant(base_lr: f64) -> Self {
        Self { base_lr, warmup_steps: 0, decay: Decay::Constant }
    }

    /// Learning rate for optimiser step `step` (1-based: the first update is step 1).
    pub fn lr_at(&self, step: u64) -> f64 {
        let step = step.max(1);
        if step <= self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps as f64;
        }
        match &self.decay {
            Decay::Constant => self.base_lr,
            Decay::Cosine { total_steps, min_lr } => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                min_lr + (self.base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_cpu_update_matches_tensor_update() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let slot = |decay: bool| Slot {
            name: "w".into(),
            var: Var::from_tensor(&init).unwrap(),
            m: init.zeros_like().unwrap(),
            v: init.zeros_like().unwrap(),
            decay,
        };
        for decay in [true, false] {
            let (mut a, mut b) = (slot(decay), slot(decay));
            for t in 1..=3 {
                let g = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
                let k = Coefs {
                    decay: 1.0 - 1e-2 * 0.05,
                    b1: 0.9,
                    b2: 0.95,
                    step: 1e-2 / (1.0 - 0.9f64.powi(t)),
                    inv_bc2: 1.0 / (1.0 - 0.95f64.powi(t)),
                    eps: 1e-8,
                };
                // A clipping factor on one step: applied inside the CPU update.
                let scale = if t == 2 { 0.5 } else { 1.0 };
                update_cpu(&mut a, &g, scale as f32, &k).unwrap();
                update_tensor(&mut b, &g.affine(scale, 0.0).unwrap(), &k).unwrap();
            }
            for (x, y) in [(a.var.as_tensor(), b.var.as_tensor()), (&a.m, &b.m), (&a.v, &b.v)] {
                let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-6, "difference {d}");
            }
            assert_ne!(a.var.as_tensor().to_vec2::<f32>().unwrap(), init.to_vec2::<f32>().unwrap());
        }
    }
}

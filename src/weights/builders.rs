//! Variable builders and initialisers for any model built against a `VarMap`: a seeded
//! builder (reproducible fresh variables), a zeros builder for models whose weights are about
//! to be loaded, and seeded re-initialisation of existing variables.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// Set every variable of `varmap` to `value(name, dims, rng)`, visiting them in name order
/// with one RNG seeded by `seed`, so the result depends on the seed only.
pub fn init_vars(varmap: &VarMap, seed: u64, value: impl FnMut(&str, &[usize], &mut crate::util::Rng) -> Vec<f32>) -> Result<()> {
    init_some_vars(varmap, seed, |_| true, value)
}

/// [`init_vars`] for the variables whose name passes `pick` only (in name order, one RNG).
pub fn init_some_vars(varmap: &VarMap, seed: u64, pick: impl Fn(&str) -> bool, mut value: impl FnMut(&str, &[usize], &mut crate::util::Rng) -> Vec<f32>) -> Result<()> {
    let mut rng = crate::util::rng(seed);
    for (name, var) in crate::nn::named_vars(varmap) {
        if !pick(&name) {
            continue;
        }
        let dims = var.dims().to_vec();
        let v = value(&name, &dims, &mut rng);
        let t = Tensor::from_vec(v, dims, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// A `VarBuilder` over `varmap` whose new variables are drawn from an RNG seeded by `seed`
/// (candle's own initialisers draw from an unseeded RNG), following each variable's `Init`
/// hint (constant, uniform, normal, Kaiming). Draws happen in the order the model creates its
/// variables, which its constructor fixes, so the result depends on the seed only. Variables
/// already in `varmap` are returned as they are (a wrong shape is an error).
pub fn seeded_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend = SeededInit { map: varmap.clone(), rng: Some(std::sync::Mutex::new(crate::util::rng(seed))), detached: false };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// A `VarBuilder` over `varmap` whose new variables are zeros, for an inference model whose
/// weights are about to be loaded: no random draws (a normal draw costs tens of nanoseconds
/// per weight, many times what reading the weight from the file costs).
///
/// The model gets detached views of the variables: the same storage (loading into `varmap`
/// sets the model's weights), but not marked as variables, so its ops record no backprop
/// graph. With variables, every output of a forward pass would keep all the activations it
/// was computed from alive until it is dropped (a batch of 8 images through the tokenizer's
/// decoder held hundreds of MB). Models that train are built with
/// `VarBuilder::from_varmap` or [`seeded_builder`].
pub fn zeros_builder(varmap: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend = SeededInit { map: varmap.clone(), rng: None, detached: true };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// New variables drawn from `rng` under their `Init` hints, or zeros without one.
struct SeededInit {
    map: VarMap,
    rng: Option<std::sync::Mutex<crate::util::Rng>>,
    /// Hand out detached views of the variables (inference) instead of the variables.
    detached: bool,
}

/// Values of a fresh variable of `shape` under `init`.
fn init_values(init: &candle_nn::Init, shape: &candle_core::Shape, rng: &mut crate::util::Rng) -> Vec<f32> {
    use candle_nn::init::{Init, NormalOrUniform};
    use rand::Rng as _;
    let n = shape.elem_count();
    let uniform = |rng: &mut crate::util::Rng, lo: f64, up: f64| -> Vec<f32> { (0..n).map(|_| rng.random_range(lo..=up) as f32).collect() };
    match *init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => (0..n).map(|_| mean as f32 + stdev as f32 * normal(rng)).collect(),
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => (0..n).map(|_| std as f32 * normal(rng)).collect(),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
            }
        }
    }
}

impl SeededInit {
    fn view(&self, var: &candle_core::Var) -> Tensor {
        if self.detached {
            var.as_detached_tensor()
        } else {
            var.as_tensor().clone()
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(&self, s: candle_core::Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("variable {name}: shape {:?} asked for, {:?} exists", s.dims(), v.shape().dims());
            }
            return Ok(self.view(v));
        }
        let value = match &self.rng {
            Some(rng) => Tensor::from_vec(init_values(&h, &s, &mut rng.lock().unwrap_or_else(|e| e.into_inner())), s, dev)?.to_dtype(dtype)?,
            None => Tensor::zeros(s, dtype, dev)?,
        };
        let var = candle_core::Var::from_tensor(&value)?;
        let t = self.view(&var);
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("variable {name}: a new variable needs its shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.data().lock().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }
}

/// A standard normal draw (Box-Muller) from the project RNG.
pub fn normal(rng: &mut crate::util::Rng) -> f32 {
    use rand::Rng as _;
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

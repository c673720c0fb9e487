//! Checkpoints: LlamaGen / EditAR / TokenAR torch files and this project's safetensors
//! (config as JSON in the metadata), plus seeded initialisation.

use super::config::GptConfig;
use super::gpt::{TokenAr, BUFFERS};
use crate::error::{Error, Result};
use crate::weights::{self, LoadOptions, LoadReport, TensorFile};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::BTreeMap;
use std::path::Path;

/// Metadata key holding the [`GptConfig`] JSON in this project's checkpoints.
pub const CONFIG_KEY: &str = "tokenar.gpt_config";

/// Parameters that TokenAR adds to LlamaGen: absent from a LlamaGen (or EditAR) checkpoint,
/// they are freshly initialised and reported in [`LoadReport::fresh`].
pub const ADDITIONS: [&str; 5] = ["ref_index_embeddings.", "instruct_token_embeddings.", "alignment.", "img_uncond_embedding", "cell_embeddings."];

/// Non-parameter entries some reference checkpoints carry; ignored.
const IGNORED: [&str; 2] = ["freqs_cis", "causal_mask"];

/// Build a fresh model with a `VarMap` (seeded with [`init_weights`]).
pub fn build(cfg: &GptConfig, device: &Device, seed: u64) -> Result<(TokenAr, VarMap)> {
    let varmap = VarMap::new();
    let model = TokenAr::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    init_weights(&varmap, seed)?;
    Ok((model, varmap))
}

/// Re-initialise every variable from `seed` with LlamaGen's rules: norms 1, `output` 0,
/// biases 0, buffers N(0, 1/width), everything else N(0, 0.02). Variables are visited in name
/// order, so the result depends on the seed only.
pub fn init_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    init_vars(varmap, seed, llamagen_init)
}

/// LlamaGen's initial value of the variable `name` of shape `dims` (see [`init_weights`]).
fn llamagen_init(name: &str, dims: &[usize], rng: &mut crate::util::Rng) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let width = *dims.last().unwrap_or(&1) as f32;
    if name.ends_with("norm.weight") {
        vec![1.0; n]
    } else if name == "output.weight" || name.ends_with(".bias") {
        vec![0.0; n]
    } else if BUFFERS.contains(&name) {
        (0..n).map(|_| normal(rng) / width.sqrt()).collect()
    } else {
        (0..n).map(|_| normal(rng) * 0.02).collect()
    }
}

/// Set every variable of `varmap` to `value(name, dims, rng)`, visiting them in name order
/// with one RNG seeded by `seed`, so the result depends on the seed only.
pub fn init_vars(varmap: &VarMap, seed: u64, value: impl FnMut(&str, &[usize], &mut crate::util::Rng) -> Vec<f32>) -> Result<()> {
    init_some_vars(varmap, seed, |_| true, value)
}

/// [`init_vars`] for the variables whose name passes `pick` only (in name order, one RNG).
fn init_some_vars(varmap: &VarMap, seed: u64, pick: impl Fn(&str) -> bool, mut value: impl FnMut(&str, &[usize], &mut crate::util::Rng) -> Vec<f32>) -> Result<()> {
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

/// Load a checkpoint. This project's safetensors carry their config (which takes precedence
/// over `preset`). A reference checkpoint (.pt/.pth/.bin, or safetensors without config) gets
/// the architecture its tensor shapes determine ([`GptConfig::infer_from_tensors`]); a named
/// `preset` is checked against them. Parameters that TokenAR adds (`ADDITIONS`) may be absent
/// (e.g. a LlamaGen checkpoint loaded into a TokenAR preset): they are freshly initialised and
/// listed in the report's `fresh`. Any other missing key, a shape mismatch, or an unknown key
/// is an error naming it.
pub fn load(path: &Path, preset: Option<&str>, device: &Device) -> Result<(TokenAr, VarMap, LoadReport)> {
    load_with_hints(path, preset, None, device)
}

/// [`load`] with the token grid side for a reference checkpoint that does not record it
/// (LlamaGen t2i; see [`GptConfig::infer_from_tensors`]).
pub fn load_with_hints(path: &Path, preset: Option<&str>, grid: Option<usize>, device: &Device) -> Result<(TokenAr, VarMap, LoadReport)> {
    let mut file = TensorFile::load(path, device)?;
    // The reference's ModuleList head names (`alignment.0.*`) load as `alignment.*`.
    super::alignment::normalize_keys(&mut file.tensors);
    let cfg = match file.metadata.get(CONFIG_KEY) {
        Some(_) => config_from_metadata(&file)?,
        None => config_from_tensors(&file, preset, grid)?,
    };
    load_with_config(&mut file, &cfg, device)
}

/// The architecture of a reference checkpoint from its tensor shapes (see
/// [`GptConfig::infer_from_tensors`]).
pub fn config_from_tensors(file: &TensorFile, preset: Option<&str>, grid: Option<usize>) -> Result<GptConfig> {
    let shapes: BTreeMap<String, Vec<usize>> = file.tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    GptConfig::infer_from_tensors(&shapes, &file.path, preset, grid)
}

/// The config this project writes into its checkpoints' metadata.
pub fn config_from_metadata(file: &TensorFile) -> Result<GptConfig> {
    let json = file
        .metadata
        .get(CONFIG_KEY)
        .ok_or_else(|| Error::bad_file(&file.path, format!("no `{CONFIG_KEY}` model config in the metadata")))?;
    let cfg: GptConfig = serde_json::from_str(json)
        .map_err(|e| Error::bad_file(&file.path, format!("bad model config in metadata: {e}")))?;
    cfg.validate().map_err(|e| Error::bad_file(&file.path, e.to_string()))?;
    cfg.check_fits_values(file.tensors.values().map(|t| t.elem_count()).sum())
        .map_err(|e| Error::bad_file(&file.path, e.to_string()))?;
    Ok(cfg)
}

/// Load `file` into a model built from `cfg` (see [`load`]).
pub fn load_with_config(file: &mut TensorFile, cfg: &GptConfig, device: &Device) -> Result<(TokenAr, VarMap, LoadReport)> {
    let varmap = VarMap::new();
    let model = TokenAr::new(cfg, zeros_builder(&varmap, DType::F32, device))?;
    let opts = LoadOptions {
        allow_missing: ADDITIONS.iter().map(|s| s.to_string()).collect(),
        ignore: IGNORED.iter().map(|s| s.to_string()).collect(),
        strict_unexpected: true,
    };
    let report = weights::load_into_varmap(&varmap, file, &opts)?;
    // Only what the file lacks is initialised (LlamaGen's rules, seed 0).
    init_some_vars(&varmap, 0, |name| report.fresh.iter().any(|f| f == name), llamagen_init)?;
    Ok((model, varmap, report))
}

/// Save as safetensors with the config JSON in the metadata (atomic write).
pub fn save(path: &Path, model: &TokenAr, varmap: &VarMap) -> Result<()> {
    let json = serde_json::to_string(model.config())
        .map_err(|e| Error::invalid("model config", e.to_string()))?;
    let mut meta = BTreeMap::new();
    meta.insert(CONFIG_KEY.to_string(), json);
    meta.insert("format".to_string(), "tokenar-gpt".to_string());
    weights::save_safetensors(path, &weights::varmap_tensors(varmap), &meta)
}

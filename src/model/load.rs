//! Checkpoints: LlamaGen / EditAR / TokenAR torch files and this project's safetensors
//! (config as JSON in the metadata), plus LlamaGen's seeded initialisation. The generic
//! variable builders and initialisers live in [`crate::weights::builders`].

use super::config::GptConfig;
use super::gpt::{TokenAr, BUFFERS};
use crate::error::{Error, Result};
use crate::weights::builders::init_some_vars;
use crate::weights::{self, LoadOptions, LoadReport, TensorFile};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use std::collections::BTreeMap;
use std::path::Path;

/// Metadata key holding the [`GptConfig`] JSON in this project's checkpoints.
pub const CONFIG_KEY: &str = "tokenar.gpt_config";

/// Parameters absent from a LlamaGen (or EditAR) checkpoint are freshly initialised and
/// reported in [`LoadReport::fresh`] when they are among these.
pub use super::config::ADDITIONS;

/// Non-parameter entries some reference checkpoints carry; ignored.
pub(crate) const IGNORED: [&str; 2] = ["freqs_cis", "causal_mask"];

// The generic builders under their former path.
pub use crate::weights::builders::{init_vars, normal, seeded_builder, zeros_builder};

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
pub(crate) fn llamagen_init(name: &str, dims: &[usize], rng: &mut crate::util::Rng) -> Vec<f32> {
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

//! A model bundle: the VQ tokenizer, the text encoder and the TokenAR GPT, loaded together.
//!
//! On disk a bundle is a folder:
//! - `tokenizer.safetensors` (this project's) or a LlamaGen `vq_ds*.pt`;
//! - `model.safetensors` (this project's, config in its metadata) or a LlamaGen / EditAR /
//!   TokenAR `.pt` (its tensor shapes give the architecture; a preset, if named, is checked
//!   against them);
//! - `text.safetensors` (the built-in text encoder, config and vocabulary in its metadata) or a
//!   `t5/` folder (flan-t5: config.json, safetensors, tokenizer.json);
//! - `sampling.toml` (optional): the sampling settings the model is meant to be used with
//!   (`cfg_scale`, `temperature`, `top_k`, `top_p`); command-line flags override them. Without
//!   it, TokenAR's settings (cfg 3, top-k 1000).
//!
//! The built-in model is compiled into the binary when `assets/builtin/` holds it.

use crate::error::{Error, Result};
use crate::model::{self, Family, GptConfig, TokenAr};
use crate::sample::SampleOptions;
use crate::text::{BuiltinTextEncoder, Padding, T5Encoder, T5Options, TextEncoder};
use crate::tokenizer::{self, Vq};
use crate::weights::{self, LoadReport, TensorFile};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::path::{Path, PathBuf};

pub const TOKENIZER_FILE: &str = "tokenizer.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";
pub const TEXT_FILE: &str = "text.safetensors";
pub const SAMPLING_FILE: &str = "sampling.toml";
pub const T5_DIR: &str = "t5";
/// Prefix of the built-in text encoder's variables.
pub const TEXT_PREFIX: &str = "text_encoder";

/// The text side of a bundle.
pub enum TextModel {
    Builtin(BuiltinTextEncoder),
    T5(T5Encoder),
}

impl TextModel {
    pub fn name(&self) -> &'static str {
        match self {
            TextModel::Builtin(_) => "built-in",
            TextModel::T5(_) => "t5",
        }
    }

    fn encoder(&self) -> &dyn TextEncoder {
        match self {
            TextModel::Builtin(t) => t,
            TextModel::T5(t) => t,
        }
    }

    /// Features `(B, len, D)` and mask `(B, len)` padded (right) or truncated to `len` rows.
    pub fn encode(&self, prompts: &[String], len: usize) -> Result<(Tensor, Tensor)> {
        let (f, m) = self.encoder().encode(prompts)?;
        fit_rows(&f, &m, len)
    }

    /// One line for `tokenar info`.
    pub fn describe(&self) -> String {
        match self {
            TextModel::Builtin(e) => format!("built-in ({} words, {}-d, {} layers)", e.vocab().len(), e.config().dim, e.config().n_layer),
            TextModel::T5(t) => format!("T5 ({}-d, {} rows, {:?} padding, padded rows {:?})", t.dim(), t.max_len(), t.padding(), t.options().pad_rows),
        }
    }
}

/// Pad with zero rows (mask 0) at the end, or cut, so that features have exactly `len` rows.
pub fn fit_rows(features: &Tensor, mask: &Tensor, len: usize) -> Result<(Tensor, Tensor)> {
    let (b, l, d) = features.dims3()?;
    let mask = mask.to_dtype(DType::F32)?;
    if l == len {
        return Ok((features.clone(), mask));
    }
    if l > len {
        return Ok((features.narrow(1, 0, len)?, mask.narrow(1, 0, len)?));
    }
    let fz = Tensor::zeros((b, len - l, d), features.dtype(), features.device())?;
    let mz = Tensor::zeros((b, len - l), DType::F32, features.device())?;
    Ok((Tensor::cat(&[features, &fz], 1)?, Tensor::cat(&[&mask, &mz], 1)?))
}

/// The sampling settings a bundle recommends (`sampling.toml`); fields left out keep TokenAR's
/// defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingDefaults {
    pub cfg_scale: f32,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    /// LlamaGen's `cfg_interval` (see [`SampleOptions::cfg_interval`]); absent: guided throughout.
    pub cfg_interval: Option<usize>,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        let o = SampleOptions::default();
        Self { cfg_scale: o.cfg_scale, temperature: o.temperature, top_k: o.top_k, top_p: o.top_p, cfg_interval: o.cfg_interval }
    }
}

impl SamplingDefaults {
    /// Parse `sampling.toml` text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let d: Self = toml::from_str(text).map_err(|e| Error::invalid(origin, format!("bad sampling settings: {e}")))?;
        d.options(0).validate().map_err(|e| Error::invalid(origin, e.to_string()))?;
        Ok(d)
    }

    /// Read `dir/sampling.toml` if there is one.
    pub fn load_dir(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(SAMPLING_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        Self::from_toml(&text, &p.display().to_string()).map(Some)
    }

    pub fn options(&self, seed: u64) -> SampleOptions {
        SampleOptions {
            cfg_scale: self.cfg_scale,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed,
            cfg_interval: self.cfg_interval,
        }
    }

    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "# Sampling settings this model is meant to be used with (flags override them).\ncfg_scale = {:?}\ntemperature = {:?}\ntop_k = {}\ntop_p = {:?}\n",
            self.cfg_scale, self.temperature, self.top_k, self.top_p
        );
        if let Some(i) = self.cfg_interval {
            s.push_str(&format!("cfg_interval = {i}\n"));
        }
        s
    }
}

/// Tokenizer, text encoder and GPT, with the variable maps they were built on.
pub struct Bundle {
    pub vq: Vq,
    pub vq_vars: VarMap,
    pub gpt: TokenAr,
    pub gpt_vars: VarMap,
    pub text: TextModel,
    pub text_vars: Option<VarMap>,
    /// Where it came from (a folder, or "built-in").
    pub source: String,
    /// What loading the GPT reported (fresh keys when initialised from another family).
    pub report: LoadReport,
    /// The sampling settings the bundle recommends.
    pub sampling: SamplingDefaults,
}

/// Where a bundle's text encoder comes from.
#[derive(Debug, Clone)]
pub enum TextSource {
    /// `text.safetensors`: the built-in encoder.
    Builtin(PathBuf),
    /// A flan-t5 folder.
    T5(PathBuf),
}

/// Files of a bundle folder.
#[derive(Debug, Clone)]
pub struct BundlePaths {
    pub tokenizer: PathBuf,
    pub model: PathBuf,
    pub text: TextSource,
}

fn find_one(dir: &Path, preferred: &str, accept: &dyn Fn(&str) -> bool, what: &str) -> Result<PathBuf> {
    let p = dir.join(preferred);
    if p.exists() {
        return Ok(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().map(|n| accept(&n.to_string_lossy())).unwrap_or(false))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::bad_file(dir, format!("no {what} found (expected `{preferred}`)"))),
        _ => Err(Error::bad_file(
            dir,
            format!("several candidate {what} files ({}); keep one or name it `{preferred}`", found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
        )),
    }
}

impl BundlePaths {
    pub fn find(dir: &Path) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::bad_file(dir, "is a file, but --weights takes a bundle folder (holding tokenizer.safetensors, model.safetensors and text.safetensors or t5/); `tokenar info --weights FILE` describes a single checkpoint"));
        }
        if !dir.is_dir() {
            return Err(Error::bad_file(dir, "weights folder not found (expected a folder holding tokenizer.safetensors, model.safetensors and text.safetensors or t5/)"));
        }
        let is_pt = |n: &str| n.ends_with(".pt") || n.ends_with(".pth");
        let tokenizer = find_one(dir, TOKENIZER_FILE, &|n| is_pt(n) && n.starts_with("vq"), "tokenizer")?;
        let model = find_one(dir, MODEL_FILE, &|n| is_pt(n) && !n.starts_with("vq"), "GPT checkpoint")?;
        let builtin = dir.join(TEXT_FILE);
        let text = if builtin.exists() {
            TextSource::Builtin(builtin)
        } else {
            match [T5_DIR, "flan-t5-xl"].iter().map(|d| dir.join(d)).find(|p| p.is_dir()) {
                Some(t5) => TextSource::T5(t5),
                None => {
                    return Err(Error::bad_file(dir, format!("no text encoder: expected `{TEXT_FILE}` or a `{T5_DIR}/` folder")))
                }
            }
        };
        Ok(Self { tokenizer, model, text })
    }
}

/// Options for loading checkpoints that do not describe themselves (`.pt` files).
#[derive(Debug, Clone, Default)]
pub struct LoadHints {
    /// GPT preset for a `.pt` model (e.g. `tokenar-xl`).
    pub preset: Option<String>,
    /// Tokenizer preset: a check of the architecture the tokenizer file describes, or the
    /// architecture of a file that does not describe one.
    pub tokenizer_preset: Option<String>,
    /// How the GPT's linear weights are stored: converted one at a time while loading
    /// (`weights::convert::load_converted`), never all in f32.
    pub dtype: crate::nn::WeightDtype,
}

impl Bundle {
    /// Load a bundle folder.
    pub fn load(dir: &Path, hints: &LoadHints, device: &Device) -> Result<Self> {
        Self::load_with_grid(dir, hints, None, device)
    }

    /// [`Bundle::load`] with the token grid side for a `.pt` GPT that does not record it
    /// (LlamaGen t2i; default [`model::config::DEFAULT_GRID`]).
    pub fn load_with_grid(dir: &Path, hints: &LoadHints, grid: Option<usize>, device: &Device) -> Result<Self> {
        let paths = BundlePaths::find(dir)?;
        // The tokenizer's shapes come from the file; a preset only checks them.
        let (vq, vq_vars) = tokenizer::load(&paths.tokenizer, hints.tokenizer_preset.as_deref(), device)?;
        let (gpt, gpt_vars, report) = crate::weights::convert::load_converted(&paths.model, hints.preset.as_deref(), grid, hints.dtype, device)?;
        let (text, text_vars) = match &paths.text {
            TextSource::Builtin(t) => {
                let (enc, vm) = builtin_text_from_file(&mut TensorFile::load(t, device)?, device)?;
                (TextModel::Builtin(enc), Some(vm))
            }
            TextSource::T5(folder) => {
                // LlamaGen left-pads (padded rows zero); EditAR / TokenAR right-pad and read the
                // encoder's outputs at the padded rows too (docs/reference.md).
                let padding = match gpt.config().family {
                    Family::LlamaGen => Padding::Left,
                    _ => Padding::Right,
                };
                let mut opts = T5Options::new(padding);
                if matches!(gpt.config().family, Family::EditAr | Family::TokenAr) {
                    opts.pad_rows = crate::text::t5::PadRows::Encoded;
                }
                opts.max_len = gpt.config().caption_len;
                (TextModel::T5(T5Encoder::load(folder, opts, device)?), None)
            }
        };
        let sampling = SamplingDefaults::load_dir(dir)?.unwrap_or_default();
        let b = Self { vq, vq_vars, gpt, gpt_vars, text, text_vars, source: dir.display().to_string(), report, sampling };
        b.check()?;
        Ok(b)
    }

    /// Build a bundle from the three safetensors files held in memory (the built-in model) and
    /// the text of its `sampling.toml`, if any.
    pub fn from_bytes(tokenizer: &[u8], model: &[u8], text: &[u8], sampling: Option<&str>, source: &str, device: &Device) -> Result<Self> {
        let mut tf = TensorFile::from_safetensors_bytes(&format!("{source}/{TOKENIZER_FILE}"), tokenizer, device)?;
        let (vq, vq_vars) = tokenizer::load_file(&mut tf, None, device)?;
        let mut mf = TensorFile::from_safetensors_bytes(&format!("{source}/{MODEL_FILE}"), model, device)?;
        let cfg = model::config_from_metadata(&mf)?;
        let (gpt, gpt_vars, report) = model::load_with_config(&mut mf, &cfg, device)?;
        let mut xf = TensorFile::from_safetensors_bytes(&format!("{source}/{TEXT_FILE}"), text, device)?;
        let (enc, text_vars) = builtin_text_from_file(&mut xf, device)?;
        let b = Self {
            vq,
            vq_vars,
            gpt,
            gpt_vars,
            text: TextModel::Builtin(enc),
            text_vars: Some(text_vars),
            source: source.to_string(),
            report,
            sampling: match sampling {
                Some(t) => SamplingDefaults::from_toml(t, &format!("{source}/{SAMPLING_FILE}"))?,
                None => SamplingDefaults::default(),
            },
        };
        b.check()?;
        Ok(b)
    }

    /// The built-in model compiled into this binary.
    pub fn builtin(device: &Device) -> Result<Self> {
        match builtin_bytes() {
            Some((t, m, x)) => Self::from_bytes(t, m, x, builtin_sampling(), "built-in", device),
            None => Err(Error::invalid(
                "weights",
                "this build carries no built-in model (assets/builtin/ was empty when it was compiled); pass --weights DIR",
            )),
        }
    }

    /// Save as a bundle folder (this project's formats).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        tokenizer::save(&dir.join(TOKENIZER_FILE), self.vq.config(), &self.vq_vars)?;
        model::save(&dir.join(MODEL_FILE), &self.gpt, &self.gpt_vars)?;
        if let (TextModel::Builtin(t), Some(vm)) = (&self.text, &self.text_vars) {
            save_builtin_text(&dir.join(TEXT_FILE), t, vm)?;
        }
        if self.sampling != SamplingDefaults::default() {
            crate::util::atomic_write(&dir.join(SAMPLING_FILE), self.sampling.to_toml().as_bytes())?;
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        let g = self.gpt.config();
        let vq = self.vq.config();
        if g.vocab_size != vq.codebook_size {
            return Err(Error::invalid(
                "bundle",
                format!("the GPT's vocabulary ({}) differs from the tokenizer's codebook ({})", g.vocab_size, vq.codebook_size),
            ));
        }
        let text_dim = self.text.encoder().dim();
        if text_dim != g.caption_dim {
            return Err(Error::invalid(
                "bundle",
                format!("the text encoder gives {text_dim}-d features but the GPT expects {}", g.caption_dim),
            ));
        }
        Ok(())
    }

    /// Image size the bundle works at: grid x tokenizer downsampling.
    pub fn image_size(&self) -> usize {
        self.gpt.config().grid.0 * self.vq.config().downsample()
    }

    /// Side of a reference as the model sees it: the image size, or for a model with
    /// references on a grid of their own, that grid x tokenizer downsampling (references are
    /// then cropped to their subject, see [`crate::imageio::reference_view`]).
    pub fn ref_image_size(&self) -> usize {
        self.gpt.config().ref_grid().0 * self.vq.config().downsample()
    }

    pub fn config(&self) -> &GptConfig {
        self.gpt.config()
    }
}

/// Built-in text encoder from its file (config and vocabulary in the metadata).
pub fn builtin_text_from_file(file: &mut TensorFile, device: &Device) -> Result<(BuiltinTextEncoder, VarMap)> {
    let vm = VarMap::new();
    // Every variable is loaded (strictly): zeros until then, no random draws.
    let enc = BuiltinTextEncoder::from_metadata(&file.metadata, crate::weights::builders::zeros_builder(&vm, DType::F32, device).pp(TEXT_PREFIX))?;
    let opts = weights::LoadOptions { strict_unexpected: true, ..Default::default() };
    weights::load_into_varmap(&vm, file, &opts)?;
    Ok((enc, vm))
}

pub fn save_builtin_text(path: &Path, enc: &BuiltinTextEncoder, vm: &VarMap) -> Result<()> {
    weights::save_safetensors(path, &weights::varmap_tensors(vm), &enc.metadata())
}

#[cfg(tokenar_builtin)]
fn builtin_bytes() -> Option<(&'static [u8], &'static [u8], &'static [u8])> {
    Some((
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/builtin/tokenizer.safetensors")),
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/builtin/model.safetensors")),
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/builtin/text.safetensors")),
    ))
}

#[cfg(tokenar_builtin_sampling)]
fn builtin_sampling() -> Option<&'static str> {
    Some(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/builtin/sampling.toml")))
}

#[cfg(not(tokenar_builtin_sampling))]
fn builtin_sampling() -> Option<&'static str> {
    None
}

#[cfg(not(tokenar_builtin))]
fn builtin_bytes() -> Option<(&'static [u8], &'static [u8], &'static [u8])> {
    None
}

/// Whether this binary carries the built-in model.
pub fn has_builtin() -> bool {
    builtin_bytes().is_some()
}

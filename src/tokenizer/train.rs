//! Tokenizer training on a folder of images: reconstruction loss (L1 + L2), codebook and
//! commitment losses, AdamW, dead-code restarts, periodic checkpoints (safetensors, atomic)
//! with resume (weights and AdamW moments), a JSON-lines metrics log and a PNG of originals over reconstructions.
//!
//! The configuration is a TOML file; every field is documented in
//! `configs/tokenizer-small.toml`.

use super::dataset::{self, EvalReport};
use super::{build, save_with_meta, Vq, VqConfig};
use crate::error::{Error, IoContext, Result};
use crate::imageio;
use crate::weights::{self, LoadOptions, TensorFile};
use candle_core::{Device, Tensor};
use crate::train::{AdamW, AdamWParams};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Metadata key of the training step in checkpoints.
pub const META_STEP: &str = "tokenar.train.step";
/// Name of the checkpoint inside `out_dir`.
pub const CHECKPOINT: &str = "vq.safetensors";
/// Name of the optimiser state (AdamW moments) inside `out_dir`, written with each checkpoint.
pub const OPTIM_STATE: &str = "optim.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data_dir: PathBuf,
    #[serde(default)]
    pub eval_dir: Option<PathBuf>,
    pub out_dir: PathBuf,
    #[serde(default = "d_preset")]
    pub preset: String,
    #[serde(default)]
    pub model: Option<VqConfig>,
    #[serde(default)]
    pub codebook_size: Option<usize>,
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default = "d_exclude")]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub max_train_images: Option<usize>,
    #[serde(default = "d_eval_images")]
    pub eval_images: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_steps")]
    pub steps: usize,
    #[serde(default)]
    pub max_minutes: Option<f64>,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_lr_min")]
    pub lr_min_ratio: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: usize,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_b1")]
    pub beta1: f64,
    #[serde(default = "d_b2")]
    pub beta2: f64,
    #[serde(default = "d_one")]
    pub l1_weight: f64,
    #[serde(default = "d_one")]
    pub l2_weight: f64,
    #[serde(default = "d_one")]
    pub codebook_weight: f64,
    #[serde(default = "d_true")]
    pub flip: bool,
    #[serde(default)]
    pub crop_size: Option<usize>,
    #[serde(default = "d_dead")]
    pub dead_code_every: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_log")]
    pub log_every: usize,
    #[serde(default = "d_ckpt")]
    pub ckpt_every: usize,
    #[serde(default = "d_true")]
    pub resume: bool,
    /// Weights to start from when `out_dir` holds no checkpoint yet (strictly loaded; the
    /// model config must match them).
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// Train the decoder only (`post_quant_conv` and `decoder`): the encoder, `quant_conv` and
    /// the codebook stay as loaded, so every code (and any code cache made with the tokenizer)
    /// keeps its meaning. No dead-code restarts. Meant with `init`.
    #[serde(default)]
    pub decoder_only: bool,
}

fn d_preset() -> String { "vq-small".into() }
fn d_exclude() -> Vec<String> { dataset::NOT_PICTURES.iter().map(|s| s.to_string()).collect() }
fn d_eval_images() -> usize { 64 }
fn d_batch() -> usize { 16 }
fn d_steps() -> usize { 4000 }
fn d_lr() -> f64 { 1e-3 }
fn d_lr_min() -> f64 { 0.1 }
fn d_warmup() -> usize { 100 }
fn d_wd() -> f64 { 0.0 }
fn d_b1() -> f64 { 0.9 }
fn d_b2() -> f64 { 0.95 }
fn d_one() -> f64 { 1.0 }
fn d_true() -> bool { true }
fn d_dead() -> usize { 50 }
fn d_seed() -> u64 { 0 }
fn d_log() -> usize { 10 }
fn d_ckpt() -> usize { 250 }

impl TrainConfig {
    /// Read a TOML file, apply `key=value` overrides (dotted keys reach into tables; values
    /// are TOML literals, or strings when they do not parse as one), and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_path(path)?;
        let mut value: toml::Value =
            toml::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid TOML: {e}")))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: Self = value
            .try_into()
            .map_err(|e| Error::bad_file(path, format!("bad tokenizer training config: {e}")))?;
        cfg.model_config()?;
        if cfg.batch_size == 0 || cfg.steps == 0 || cfg.log_every == 0 || cfg.ckpt_every == 0 {
            return Err(Error::invalid("training config", "batch_size, steps, log_every and ckpt_every must be positive"));
        }
        Ok(cfg)
    }

    /// The model config: `model` if given, else the preset, with `codebook_size` and
    /// `image_size` overrides applied.
    pub fn model_config(&self) -> Result<VqConfig> {
        let mut m = match &self.model {
            Some(m) => m.clone(),
            None => VqConfig::preset(&self.preset)?,
        };
        if let Some(k) = self.codebook_size {
            m.codebook_size = k;
        }
        if let Some(s) = self.image_size {
            m.image_size = s;
        }
        m.validate()?;
        if let Some(c) = self.crop_size {
            if c == 0 || c % m.downsample() != 0 {
                return Err(Error::invalid("crop_size", format!("{c} is not a positive multiple of the downsampling {}", m.downsample())));
            }
        }
        Ok(m)
    }
}

fn apply_override(root: &mut toml::Value, item: &str) -> Result<()> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| Error::invalid("override", format!("`{item}` is not key=value")))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut node = root;
    let parts: Vec<&str> = key.trim().split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let table = node
            .as_table_mut()
            .ok_or_else(|| Error::invalid("override", format!("`{key}`: `{p}` is not inside a table")))?;
        if i + 1 == parts.len() {
            table.insert(p.to_string(), value);
            return Ok(());
        }
        node = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

/// What the caller is told after each step (to draw a progress bar).
#[derive(Debug, Clone, Serialize)]
pub struct StepInfo {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub l1: f64,
    pub l2: f64,
    pub codebook: f64,
    pub commit: f64,
    /// PSNR of the training batch (dB).
    pub psnr: f64,
    /// Codebook usage over the current dead-code window.
    pub usage: f64,
    pub lr: f64,
    pub images_per_s: f64,
    pub restarted_codes: usize,
}

/// Training outcome.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps_done: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    pub eval: Option<EvalReport>,
    pub checkpoint: PathBuf,
    pub comparison_png: Option<PathBuf>,
}

pub(crate) fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let t = (step - cfg.warmup_steps) as f64 / (cfg.steps.saturating_sub(cfg.warmup_steps)).max(1) as f64;
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos());
    cfg.lr * (cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * cos)
}

/// Replace codes unused in the last window by latent vectors of the current batch (the
/// codebook is normalised on use, so a restarted code points where the encoder's outputs are).
/// Returns how many codes were restarted.
pub(crate) fn restart_dead_codes(varmap: &VarMap, counts: &[u32], z_flat: &Tensor, rng: &mut crate::util::Rng) -> Result<usize> {
    let dead: Vec<usize> = counts.iter().enumerate().filter(|(_, c)| **c == 0).map(|(i, _)| i).collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let var = data
        .get("quantize.embedding.weight")
        .ok_or_else(|| Error::invalid("model", "no quantize.embedding.weight variable"))?;
    let mut table = var.as_tensor().to_vec2::<f32>()?;
    let z = z_flat.to_vec2::<f32>()?;
    if z.is_empty() {
        return Ok(0);
    }
    for &d in &dead {
        let src = &z[rng.random_range(0..z.len())];
        for (t, s) in table[d].iter_mut().zip(src) {
            *t = s + 0.01 * (rng.random::<f32>() - 0.5);
        }
    }
    let t = Tensor::new(table, var.device())?;
    var.set(&t)?;
    Ok(dead.len())
}

/// The variables a decoder-only run trains.
fn is_decoder_var(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

fn mean_scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

/// Train (or resume) as `cfg` says; `on_step` sees every step.
pub fn train(cfg: &TrainConfig, device: &Device, on_step: &mut dyn FnMut(&StepInfo)) -> Result<TrainSummary> {
    let mcfg = cfg.model_config()?;
    let size = mcfg.image_size as u32;
    std::fs::create_dir_all(&cfg.out_dir).with_path(&cfg.out_dir)?;
    let ckpt = cfg.out_dir.join(CHECKPOINT);

    let train_paths = dataset::list_images(&cfg.data_dir, &cfg.exclude)?;
    let train_imgs = dataset::load_images(&train_paths, size, cfg.max_train_images)?;
    let eval_imgs = match &cfg.eval_dir {
        Some(d) => dataset::load_images(&dataset::list_images(d, &cfg.exclude)?, size, Some(cfg.eval_images))?,
        None => Vec::new(),
    };
    let preview: Vec<_> = if eval_imgs.is_empty() { &train_imgs } else { &eval_imgs }.iter().take(8).cloned().collect();

    let (vq, varmap) = build(&mcfg, device, cfg.seed)?;
    let mut start = 0usize;
    let strict = LoadOptions { strict_unexpected: true, ..Default::default() };
    if cfg.resume && ckpt.exists() {
        let mut file = TensorFile::load(&ckpt, device)?;
        weights::load_into_varmap(&varmap, &mut file, &strict)?;
        start = file.metadata.get(META_STEP).and_then(|s| s.parse().ok()).unwrap_or(0);
    } else if let Some(init) = &cfg.init {
        weights::load_into_varmap(&varmap, &mut TensorFile::load(init, device)?, &strict)?;
    }
    let params = AdamWParams {
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let trained = crate::nn::named_vars(&varmap)
        .into_iter()
        .filter(|(name, _)| !cfg.decoder_only || is_decoder_var(name))
        .collect();
    let mut opt = AdamW::new(trained, params)?;
    let optim_path = cfg.out_dir.join(OPTIM_STATE);
    if start > 0 && optim_path.exists() {
        // The moments continue where they were; a state of another step is not used.
        let state = TensorFile::load(&optim_path, device)?;
        if state.metadata.get(META_STEP).map(String::as_str) == Some(start.to_string().as_str()) {
            opt.load_state(&state.tensors, &state.metadata, &optim_path)?;
        }
    }
    let mut rng = crate::util::rng(cfg.seed.wrapping_add(start as u64));
    let log_path = cfg.out_dir.join("metrics.jsonl");
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_path(&log_path)?;

    let mut order: Vec<usize> = (0..train_imgs.len()).collect();
    let mut cursor = order.len();
    let k = mcfg.codebook_size;
    let mut counts = vec![0u32; k];
    let t0 = Instant::now();
    let mut images_seen = 0usize;
    let mut step = start;
    let mut last_png = None;
    let mut restarted = 0usize;
    while step < cfg.steps {
        if let Some(m) = cfg.max_minutes {
            if t0.elapsed().as_secs_f64() > m * 60.0 {
                break;
            }
        }
        let mut idx = Vec::with_capacity(cfg.batch_size);
        while idx.len() < cfg.batch_size {
            if cursor >= order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            idx.push(order[cursor]);
            cursor += 1;
        }
        let imgs: Vec<_> = idx.iter().map(|&i| &train_imgs[i]).collect();
        let flips: Vec<bool> = idx.iter().map(|_| cfg.flip && rng.random::<bool>()).collect();
        let x = dataset::batch(&imgs, &flips, device)?;
        let x = match cfg.crop_size {
            Some(c) if c < size as usize => {
                let (y0, x0) = (rng.random_range(0..=size as usize - c), rng.random_range(0..=size as usize - c));
                x.narrow(2, y0, c)?.narrow(3, x0, c)?.contiguous()?
            }
            _ => x,
        };

        let lr = lr_at(cfg, step);
        opt.set_lr(lr);
        let out = if cfg.decoder_only { vq.forward_frozen_codes(&x)? } else { vq.forward_train(&x)? };
        let diff = (&out.recon - &x)?;
        let l1 = diff.abs()?.mean_all()?;
        let l2 = diff.sqr()?.mean_all()?;
        let loss = ((&l1 * cfg.l1_weight)? + (&l2 * cfg.l2_weight)?)?;
        let loss = (loss + ((&out.quant.codebook_loss + &out.quant.commit_loss)? * cfg.codebook_weight)?)?;
        let loss_v = mean_scalar(&loss)?;
        if !loss_v.is_finite() {
            return Err(Error::Numerical(format!("loss is {loss_v} at step {step}")));
        }
        opt.step(&loss.backward()?)?;
        step += 1;
        images_seen += idx.len();

        for c in out.quant.codes.flatten_all()?.to_vec1::<u32>()? {
            if let Some(n) = counts.get_mut(c as usize) {
                *n += 1;
            }
        }
        let usage = counts.iter().filter(|c| **c > 0).count() as f64 / k as f64;
        if !cfg.decoder_only && cfg.dead_code_every > 0 && step % cfg.dead_code_every == 0 {
            restarted = restart_dead_codes(&varmap, &counts, &out.quant.z_flat, &mut rng)?;
            counts.iter_mut().for_each(|c| *c = 0);
        }
        let secs = t0.elapsed().as_secs_f64();
        let info = StepInfo {
            step,
            steps: cfg.steps,
            loss: loss_v,
            l1: mean_scalar(&l1)?,
            l2: mean_scalar(&l2)?,
            codebook: mean_scalar(&out.quant.codebook_loss)?,
            commit: mean_scalar(&out.quant.commit_loss)?,
            psnr: super::psnr(&out.recon.detach(), &x)?.iter().sum::<f64>() / idx.len() as f64,
            usage,
            lr,
            images_per_s: images_seen as f64 / secs.max(1e-9),
            restarted_codes: restarted,
        };
        on_step(&info);
        if step % cfg.log_every == 0 {
            let line = serde_json::to_string(&info).map_err(|e| Error::invalid("metrics", e.to_string()))?;
            writeln!(log, "{line}").with_path(&log_path)?;
        }
        if step % cfg.ckpt_every == 0 || step == cfg.steps {
            last_png = Some(checkpoint(cfg, &vq, &varmap, &opt, step, &preview, device)?);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if step > start && step % cfg.ckpt_every != 0 && step != cfg.steps {
        last_png = Some(checkpoint(cfg, &vq, &varmap, &opt, step, &preview, device)?);
    }
    let eval = if eval_imgs.is_empty() { None } else { Some(dataset::evaluate(&vq, &eval_imgs, 32, device)?) };
    if let Some(e) = &eval {
        let line = serde_json::json!({ "step": step, "eval": e }).to_string();
        writeln!(log, "{line}").with_path(&log_path)?;
    }
    Ok(TrainSummary {
        steps_done: step - start,
        seconds: secs,
        images_per_s: images_seen as f64 / secs.max(1e-9),
        eval,
        checkpoint: ckpt,
        comparison_png: last_png,
    })
}

/// Write the checkpoint and the optimiser state (atomically) and the comparison PNG; returns
/// the PNG's path.
fn checkpoint(cfg: &TrainConfig, vq: &Vq, varmap: &VarMap, opt: &AdamW, step: usize, preview: &[image::RgbImage], device: &Device) -> Result<PathBuf> {
    let mut meta = BTreeMap::new();
    meta.insert(META_STEP.to_string(), step.to_string());
    let (tensors, mut opt_meta) = opt.state();
    opt_meta.insert(META_STEP.to_string(), step.to_string());
    // The optimiser state first: a checkpoint never points at moments of a later step.
    weights::save_safetensors(cfg.out_dir.join(OPTIM_STATE), &tensors, &opt_meta)?;
    save_with_meta(&cfg.out_dir.join(CHECKPOINT), vq.config(), varmap, meta)?;
    let png = cfg.out_dir.join(format!("recon-{step:06}.png"));
    imageio::save_rgb(&png, &dataset::comparison(vq, preview, device)?)?;
    Ok(png)
}

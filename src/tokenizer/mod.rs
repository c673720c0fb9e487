//! The image tokenizer: LlamaGen's VQ-VAE (encoder, `quant_conv`, L2-normalised codebook,
//! `post_quant_conv`, decoder). Images are (B, 3, H, W) f32 in [-1, 1]; codes are (B, H/ds,
//! W/ds) u32 grids.
//!
//! The variable names are LlamaGen's checkpoint keys, so `vq_ds16_*.pt` / `vq_ds8_c2i.pt` load
//! as they are: their architecture (the `vq-16` / `vq-8` presets, or any other) is read from
//! the shapes of their tensors. This project's own checkpoints are safetensors carrying the
//! config as JSON under the metadata key [`META_CONFIG`].

pub mod blocks;
pub mod config;
pub mod dataset;
pub mod ops;
pub mod quantize;
pub mod train;

pub use config::{VqConfig, PRESETS};
pub use quantize::usage;

use crate::error::{Error, Result};
use crate::weights::{self, LoadOptions, TensorFile};
use blocks::{Conv, Decoder, Encoder};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use quantize::{QuantOut, Quantizer};
use std::collections::BTreeMap;
use std::path::Path;

/// Metadata key holding the JSON [`VqConfig`] in this project's safetensors.
pub const META_CONFIG: &str = "tokenar.vq";

/// Buffers of LlamaGen checkpoints that are not parameters here.
pub const IGNORED_KEYS: [&str; 1] = ["quantize.codebook_used"];

pub struct Vq {
    cfg: VqConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    quantize: Quantizer,
}

/// Output of [`Vq::forward_train`].
pub struct TrainOut {
    /// Reconstruction (B, 3, H, W).
    pub recon: Tensor,
    pub quant: QuantOut,
}

impl Vq {
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv: Conv::new(cfg.z_channels, cfg.codebook_dim, 1, 1, [0; 4], vb.pp("quant_conv"))?,
            post_quant_conv: Conv::new(cfg.codebook_dim, cfg.z_channels, 1, 1, [0; 4], vb.pp("post_quant_conv"))?,
            quantize: Quantizer::new(cfg.codebook_size, cfg.codebook_dim, cfg.commit_beta, vb.pp("quantize"))?,
        })
    }

    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    pub fn quantizer(&self) -> &Quantizer {
        &self.quantize
    }

    fn check_images(&self, images: &Tensor) -> Result<()> {
        let dims = images.dims();
        let ds = self.cfg.downsample();
        if dims.len() != 4 || dims[1] != 3 || dims[2] % ds != 0 || dims[3] % ds != 0 || dims[2] == 0 || dims[3] == 0 {
            return Err(Error::invalid(
                "images",
                format!("expected shape (B, 3, H, W) with H and W positive multiples of {ds}, got {dims:?}"),
            ));
        }
        if images.dtype() != DType::F32 {
            return Err(Error::invalid("images", format!("expected f32, got {:?}", images.dtype())));
        }
        Ok(())
    }

    /// Pre-quantisation latent (B, codebook_dim, h, w).
    fn latent(&self, images: &Tensor) -> Result<Tensor> {
        self.check_images(images)?;
        Ok(self.quant_conv.forward(&self.encoder.forward(images)?)?)
    }

    /// Images (B, 3, H, W) f32 in [-1, 1] -> codes (B, H/ds, W/ds) u32.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        self.check_images(images)?;
        in_chunks(&images.detach(), |x| self.quantize.encode(&self.latent(x)?))
    }

    /// Codes (B, h, w) u32 -> images (B, 3, h*ds, w*ds) f32 (roughly [-1, 1], not clamped).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        if codes.rank() != 3 || codes.dtype() != DType::U32 {
            return Err(Error::invalid(
                "codes",
                format!("expected a (B, h, w) u32 tensor, got {:?} {:?}", codes.dims(), codes.dtype()),
            ));
        }
        in_chunks(codes, |c| self.decode_latent(&self.quantize.lookup(c)?))
    }

    fn decode_latent(&self, z_q: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&self.post_quant_conv.forward(z_q)?)
    }

    /// The differentiable path used in training: encode, quantise (straight-through), decode.
    pub fn forward_train(&self, images: &Tensor) -> Result<TrainOut> {
        let quant = self.quantize.forward_train(&self.latent(images)?)?;
        let recon = self.decode_latent(&quant.z_q)?;
        Ok(TrainOut { recon, quant })
    }

    /// As [`Vq::forward_train`] with the codes held fixed: the encoder and quantiser run without
    /// gradient and the reconstruction is decoded from the looked-up codes, so gradients reach
    /// `post_quant_conv` and the decoder only. The codebook and commitment losses are zero.
    pub fn forward_frozen_codes(&self, images: &Tensor) -> Result<TrainOut> {
        let z = self.latent(&images.detach())?.detach();
        let quant = self.quantize.forward_train(&z)?;
        let z_q = quant.z_q.detach();
        let zero = Tensor::zeros((), DType::F32, images.device())?;
        let recon = self.decode_latent(&z_q)?;
        Ok(TrainOut { recon, quant: QuantOut { z_q, codebook_loss: zero.clone(), commit_loss: zero, ..quant } })
    }
}

/// Images per pass of [`Vq::encode`] and [`Vq::decode`]. Every image goes through the model on
/// its own (per-image norms and convolutions), so the result does not depend on the chunking;
/// small chunks keep the activations small enough for the allocator to reuse its memory
/// instead of mapping fresh, zero-filled pages for each large tensor of a large batch.
const INFER_CHUNK: usize = 8;

/// `f` over `x` in chunks of [`INFER_CHUNK`] along the batch, the outputs concatenated.
fn in_chunks(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let b = x.dim(0)?;
    if b <= INFER_CHUNK {
        return f(x);
    }
    let parts = (0..b).step_by(INFER_CHUNK).map(|i| f(&x.narrow(0, i, INFER_CHUNK.min(b - i))?)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Build a fresh model on `device` with its `VarMap`, initialised from `seed` (the same seed
/// gives the same weights).
pub fn build(cfg: &VqConfig, device: &Device, seed: u64) -> Result<(Vq, VarMap)> {
    let varmap = VarMap::new();
    let vq = Vq::new(cfg, crate::model::load::seeded_builder(&varmap, seed, DType::F32, device))?;
    Ok((vq, varmap))
}

/// Load from .safetensors written by this project (config in metadata key "tokenar.vq") or from
/// a LlamaGen .pt/.safetensors (architecture read from its tensors); returns the model and its
/// VarMap.
///
/// The config comes from the file: its metadata, else its tensors
/// ([`VqConfig::infer_from_shapes`]). A preset given as well is a check: it must describe the
/// same tensors (else the file is rejected, naming both). A file that describes no tokenizer
/// needs the preset. Loading is strict: a missing, misshapen or unknown key is an error naming
/// it (LlamaGen's `quantize.codebook_used` buffer is ignored).
pub fn load(path: &Path, preset: Option<&str>, device: &Device) -> Result<(Vq, VarMap)> {
    load_file(&mut TensorFile::load(path, device)?, preset, device)
}

/// Where a checkpoint's tokenizer config came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// This project's `tokenar.vq` metadata: the whole config.
    Metadata(VqConfig),
    /// The shapes of a LlamaGen-style file's tensors (GroupNorm groups and the other fields
    /// the tensors do not show are LlamaGen's).
    Shapes(VqConfig),
    /// No tokenizer keys in the file.
    Nothing,
}

/// The config a checkpoint describes: its `tokenar.vq` metadata, else the shapes of its
/// tensors. A file with tokenizer keys that do not fit together is an error naming it.
pub fn config_of(path: &Path, metadata: &BTreeMap<String, String>, shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<Found> {
    if let Some(json) = metadata.get(META_CONFIG) {
        let cfg = serde_json::from_str::<VqConfig>(json)
            .map_err(|e| Error::bad_file(path, format!("metadata `{META_CONFIG}` is not a tokenizer config: {e}")))?;
        cfg.check_limits().map_err(|e| Error::bad_file(path, format!("metadata `{META_CONFIG}`: {e}")))?;
        return Ok(Found::Metadata(cfg));
    }
    match VqConfig::infer_from_shapes(shape) {
        Ok(Some(cfg)) => Ok(Found::Shapes(cfg)),
        Ok(None) => Ok(Found::Nothing),
        Err(e) => Err(Error::bad_file(path, format!("looks like a VQ tokenizer but {e}"))),
    }
}

/// [`load`] from a checkpoint already read (e.g. one compiled into the binary).
pub fn load_file(file: &mut TensorFile, preset: Option<&str>, device: &Device) -> Result<(Vq, VarMap)> {
    let tensors = &file.tensors;
    let found = config_of(&file.path, &file.metadata, &|k| tensors.get(k).map(|t| t.dims().to_vec()))?;
    let cfg = resolve(&file.path, preset, found)?;
    cfg.check_fits_values(file.tensors.values().map(|t| t.elem_count()).sum())
        .map_err(|e| Error::bad_file(&file.path, e.to_string()))?;
    // Every variable is loaded (strictly), so it starts as zeros instead of random draws.
    let varmap = VarMap::new();
    let vq = Vq::new(&cfg, crate::model::load::zeros_builder(&varmap, DType::F32, device))?;
    let opts = LoadOptions {
        ignore: IGNORED_KEYS.iter().map(|s| s.to_string()).collect(),
        strict_unexpected: true,
        ..Default::default()
    };
    weights::load_into_varmap(&varmap, file, &opts)?;
    Ok((vq, varmap))
}

/// The config to build for a file that describes `found`, checked against `preset`, and
/// validated (errors name `path`).
pub fn resolve(path: &Path, preset: Option<&str>, found: Found) -> Result<VqConfig> {
    let bad = |msg: String| Error::bad_file(path, msg);
    let cfg = match (preset, found) {
        (Some(p), Found::Metadata(f) | Found::Shapes(f)) if !VqConfig::preset(p)?.same_architecture(&f) => {
            return Err(bad(format!(
                "holds a tokenizer of {} but preset `{p}` is {}; leave the tokenizer preset out to use the file's",
                f.describe(),
                VqConfig::preset(p)?.describe()
            )))
        }
        // The file's own config; the preset only checked it.
        (_, Found::Metadata(f)) => f,
        // Read from the tensors: the preset knows what they do not show (GroupNorm groups).
        (Some(p), _) => VqConfig::preset(p)?,
        (None, Found::Shapes(f)) => {
            f.validate().map_err(|e| {
                bad(format!(
                    "holds a tokenizer of {} whose channels LlamaGen's 32 GroupNorm groups do not divide ({e}); name the tokenizer preset it was built with",
                    f.describe()
                ))
            })?;
            f
        }
        (None, Found::Nothing) => {
            return Err(bad(format!(
                "holds no VQ tokenizer (no `{META_CONFIG}` metadata, no `encoder.conv_in.weight` and `quantize.embedding.weight`); name a tokenizer preset ({}) to load it as one",
                PRESETS.join(", ")
            )))
        }
    };
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

/// Write the model's variables to safetensors (atomically) with the config in the metadata.
pub fn save(path: &Path, cfg: &VqConfig, varmap: &VarMap) -> Result<()> {
    save_with_meta(path, cfg, varmap, BTreeMap::new())
}

/// [`save`] with extra metadata entries (training state).
pub fn save_with_meta(path: &Path, cfg: &VqConfig, varmap: &VarMap, mut meta: BTreeMap<String, String>) -> Result<()> {
    let json = serde_json::to_string(cfg).map_err(|e| Error::invalid("tokenizer config", e.to_string()))?;
    meta.insert(META_CONFIG.to_string(), json);
    weights::save_safetensors(path, &weights::varmap_tensors(varmap), &meta)
}

/// Reconstruction PSNR in dB of images in [-1, 1], computed on [0, 1] with data range 1, per
/// image and averaged (the reference metric definition).
pub fn psnr(recon: &Tensor, target: &Tensor) -> Result<Vec<f64>> {
    let to01 = |t: &Tensor| -> Result<Tensor> { Ok(((t.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?) };
    let b = target.dim(0)?;
    let mse = (to01(recon)? - to01(target)?)?.sqr()?.reshape((b, ()))?.mean(1)?.to_vec1::<f32>()?;
    Ok(mse.into_iter().map(|m| 10.0 * (1.0 / (m as f64).max(1e-10)).log10()).collect())
}

#[cfg(test)]
mod tests;

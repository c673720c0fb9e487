//! The frozen T5 text encoder (flan-t5 checkpoints) that LlamaGen, EditAR and TokenAR use.
//!
//! A model folder holds `config.json`, `tokenizer.json` and either `model.safetensors` or
//! shards `model-0000x-of-0000y.safetensors` (listed by `model.safetensors.index.json` when
//! present). The encoder stack is [`stack::Stack`] (Hugging Face's `T5EncoderModel` with its
//! attention mask); rows are placed as [`Padding`] and [`PadRows`] say.
//!
//! The reference code runs T5 on a batch right-padded to 120 tokens with an attention mask:
//! - LlamaGen keeps the valid rows only (moved last, the rest zeroed): [`PadRows::Zero`]. For
//!   the valid tokens the masked batch computes exactly what one unpadded prompt computes (the
//!   relative position bias only sees distances between valid tokens either way), so each
//!   prompt is encoded on its own, unpadded.
//! - EditAR and TokenAR feed all 120 rows to their GPT, which attends to every one of them:
//!   after the valid rows come the encoder's outputs at the `<pad>` tokens, which are not zero
//!   ([`PadRows::Encoded`]). Those are computed as the reference does, on the padded batch
//!   under the mask.

pub mod stack;

use super::{pad_features, Padding, TextEncoder, DEFAULT_MAX_LEN};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5::Config;
use stack::Stack;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Most prompts encoded in one forward pass.
pub const MAX_BATCH: usize = 32;

/// What the rows after a caption hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadRows {
    /// Zero, and masked (0 in the mask): LlamaGen, and models trained here.
    Zero,
    /// With right padding only: the encoder's outputs at `<pad>` tokens of the prompt padded
    /// to `max_len` under the attention mask, as EditAR and TokenAR compute them; the mask is 1
    /// on every row, because their GPT attends to every row.
    Encoded,
}

/// How a [`T5Encoder`] is run.
#[derive(Clone, Debug)]
pub struct T5Options {
    pub padding: Padding,
    /// Rows per caption; prompts are truncated to this many tokens (end-of-sequence included).
    pub max_len: usize,
    /// Compute dtype of the encoder (f32 on CPU; bf16 is fine on CUDA). Output is always f32.
    pub dtype: DType,
    pub pad_rows: PadRows,
}

impl T5Options {
    pub fn new(padding: Padding) -> Self {
        Self { padding, max_len: DEFAULT_MAX_LEN, dtype: DType::F32, pad_rows: PadRows::Zero }
    }
}

/// flan-t5 encoder + tokenizer loaded from a local folder.
pub struct T5Encoder {
    model: Stack,
    tokenizer: Tokenizer,
    config: Config,
    opts: T5Options,
    device: Device,
    folder: PathBuf,
}

/// The safetensors files of a model folder: the single file, the shards named by the index,
/// or the shards found by name.
pub fn weight_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let single = folder.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = folder.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_file(&index, "no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for v in map.values() {
            let name = v
                .as_str()
                .ok_or_else(|| Error::bad_file(&index, "`weight_map` values must be file names"))?;
            let p = folder.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        for f in &files {
            if !f.is_file() {
                return Err(Error::bad_file(f, format!("shard named by {} is missing", index.display())));
            }
        }
        files.sort();
        return Ok(files);
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| Error::io(folder, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.starts_with("model-") && n.contains("-of-") && n.ends_with(".safetensors")
        })
        .collect();
    if shards.is_empty() {
        return Err(Error::bad_file(
            folder,
            "no model.safetensors, model.safetensors.index.json or model-0000x-of-0000y.safetensors",
        ));
    }
    shards.sort();
    Ok(shards)
}

impl T5Encoder {
    /// Load config, tokenizer and weights from `folder`.
    pub fn load(folder: impl AsRef<Path>, opts: T5Options, device: &Device) -> Result<Self> {
        let folder = folder.as_ref();
        if opts.max_len == 0 {
            return Err(Error::invalid("max_len", "must be at least 1"));
        }
        if opts.pad_rows == PadRows::Encoded && opts.padding != Padding::Right {
            return Err(Error::invalid("T5 options", "encoded padded rows need right padding (the reference's)"));
        }
        let cfg_path = folder.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: Config = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&cfg_path, format!("not a T5 config: {e}")))?;
        let tok_path = folder.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::bad_file(&tok_path, format!("cannot read tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: opts.max_len, ..Default::default() }))
            .map_err(|e| Error::bad_file(&tok_path, format!("cannot truncate to {} tokens: {e}", opts.max_len)))?;
        let files = weight_files(folder)?;
        // SAFETY: the files are memory-mapped read-only; they must not be modified while the
        // encoder is alive, as with any memory-mapped checkpoint.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, opts.dtype, device) }
            .map_err(|e| Error::bad_file(folder, format!("cannot map weights: {e}")))?;
        let model = Stack::load(&config, vb)
            .map_err(|e| Error::bad_file(folder, format!("weights do not match config.json: {e}")))?;
        Ok(Self { model, tokenizer, config, opts, device: device.clone(), folder: folder.to_path_buf() })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn padding(&self) -> Padding {
        self.opts.padding
    }

    pub fn options(&self) -> &T5Options {
        &self.opts
    }

    /// Token ids of one prompt, end-of-sequence included, truncated to `max_len`.
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::bad_file(self.folder.join("tokenizer.json"), format!("cannot tokenize {prompt:?}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.opts.max_len);
        Ok(ids)
    }

    /// The encoder's `last_hidden_state` for one prompt: `(n_tokens, dim)` f32.
    pub fn encode_one(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.token_ids(prompt)?;
        if ids.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        let n = ids.len();
        Ok(self.forward_ids(&Tensor::from_vec(ids, (1, n), &self.device)?, None)?.squeeze(0)?)
    }

    /// `last_hidden_state` f32 for ids `(B, n)` and an optional attention mask `(B, n)`.
    fn forward_ids(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.model.forward(ids, mask)?.to_dtype(DType::F32)?)
    }

    /// [`PadRows::Encoded`]: each prompt padded to `max_len` with the pad token and encoded under
    /// its attention mask, in chunks of [`MAX_BATCH`]; every row is marked as read.
    fn encode_padded(&self, ids: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let l = self.opts.max_len;
        let pad = self.config.pad_token_id as u32;
        let mut parts = Vec::new();
        for chunk in ids.chunks(MAX_BATCH) {
            let flat: Vec<u32> = chunk.iter().flat_map(|v| v.iter().copied().chain(std::iter::repeat(pad)).take(l)).collect();
            let mask: Vec<f32> = chunk.iter().flat_map(|v| (0..l).map(move |j| if j < v.len() { 1.0 } else { 0.0 })).collect();
            let n = chunk.len();
            let ids = Tensor::from_vec(flat, (n, l), &self.device)?;
            let mask = Tensor::from_vec(mask, (n, l), &self.device)?;
            parts.push(self.forward_ids(&ids, Some(&mask))?);
        }
        if parts.is_empty() {
            return pad_features(&[], l, self.dim(), self.opts.padding, &self.device);
        }
        let f = Tensor::cat(&parts, 0)?;
        let ones = Tensor::ones((ids.len(), l), DType::F32, &self.device)?;
        Ok((f, ones))
    }
}

impl TextEncoder for T5Encoder {
    fn dim(&self) -> usize {
        self.config.d_model
    }

    fn max_len(&self) -> usize {
        self.opts.max_len
    }

    /// With [`PadRows::Zero`], prompts with the same number of tokens run together as one
    /// unpadded batch (chunks of at most [`MAX_BATCH`]); each prompt's rows are what it gets
    /// alone. With [`PadRows::Encoded`], the padded batch under its mask, as the reference.
    fn encode(&self, prompts: &[String]) -> Result<(Tensor, Tensor)> {
        let ids = prompts.iter().map(|p| self.token_ids(p)).collect::<Result<Vec<_>>>()?;
        if self.opts.pad_rows == PadRows::Encoded {
            return self.encode_padded(&ids);
        }
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, v) in ids.iter().enumerate() {
            by_len.entry(v.len()).or_default().push(i);
        }
        let mut rows: Vec<Option<Tensor>> = vec![None; prompts.len()];
        for (len, members) in by_len {
            for chunk in members.chunks(MAX_BATCH) {
                if len == 0 {
                    for &i in chunk {
                        rows[i] = Some(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
                    }
                    continue;
                }
                let flat: Vec<u32> = chunk.iter().flat_map(|&i| ids[i].iter().copied()).collect();
                let h = self.forward_ids(&Tensor::from_vec(flat, (chunk.len(), len), &self.device)?, None)?;
                for (j, &i) in chunk.iter().enumerate() {
                    rows[i] = Some(h.get(j)?);
                }
            }
        }
        let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
        pad_features(&rows, self.opts.max_len, self.dim(), self.opts.padding, &self.device)
    }
}

#[cfg(test)]
mod tests;

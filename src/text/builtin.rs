//! The built-in text encoder: a small trainable transformer over a word-level vocabulary,
//! trained jointly with the GPT of the built-in model.
//!
//! `tok_embeddings` + learned `pos_embeddings`, `n_layer` pre-norm blocks
//! (`x + proj(attn(norm1(x)))`, then `h + fc2(gelu(fc1(norm2(h))))`), bidirectional attention
//! that ignores padded tokens, a final `norm`. Output rows are right-padded to `max_len` and
//! padded rows are zero. Every op is differentiable (`crate::nn` norms and softmax).

use super::vocab::{WordVocab, PAD_ID};
use super::{Padding, TextEncoder};
use crate::error::{Error, Result};
use crate::nn::{softmax_last_dim, LayerNorm};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use std::collections::BTreeMap;

/// Metadata key holding the [`BuiltinConfig`] as JSON.
pub const CONFIG_KEY: &str = "text_encoder.config";
/// Metadata key holding the vocabulary as JSON (see [`WordVocab::to_json`]).
pub const VOCAB_KEY: &str = "text_encoder.vocab";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltinConfig {
    pub dim: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Rows per caption (prompts are truncated to this many words).
    pub max_len: usize,
    /// MLP hidden size = `mlp_ratio * dim`.
    pub mlp_ratio: usize,
    pub norm_eps: f64,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        Self { dim: 128, n_layer: 2, n_head: 4, max_len: 32, mlp_ratio: 4, norm_eps: 1e-5 }
    }
}

impl BuiltinConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("text encoder config", msg));
        if self.dim == 0 || self.n_head == 0 || !self.dim.is_multiple_of(self.n_head) {
            return bad(format!("dim {} must be a positive multiple of n_head {}", self.dim, self.n_head));
        }
        if self.max_len == 0 || self.mlp_ratio == 0 {
            return bad(format!("max_len ({}) and mlp_ratio ({}) must be at least 1", self.max_len, self.mlp_ratio));
        }
        // Limits, so that a config edited in a checkpoint's metadata is an error rather than
        // an allocation of gigabytes.
        for (name, value, max) in [("dim", self.dim, 4096), ("n_layer", self.n_layer, 64), ("n_head", self.n_head, 64), ("max_len", self.max_len, 4096), ("mlp_ratio", self.mlp_ratio, 16)] {
            if value > max {
                return bad(format!("{name} {value} is larger than the limit of {max}"));
            }
        }
        Ok(())
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(cfg: &BuiltinConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            norm1: LayerNorm::new(d, cfg.norm_eps, true, vb.pp("norm1"))?,
            qkv: candle_nn::linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: candle_nn::linear(d, d, vb.pp("attn.proj"))?,
            norm2: LayerNorm::new(d, cfg.norm_eps, true, vb.pp("norm2"))?,
            fc1: candle_nn::linear(d, cfg.mlp_ratio * d, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(cfg.mlp_ratio * d, d, vb.pp("mlp.fc2"))?,
        })
    }

    /// `x`: (B, L, D); `bias`: (B, 1, 1, L) additive attention bias (0 or a large negative).
    fn forward(&self, x: &Tensor, bias: &Tensor, n_head: usize) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / n_head;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?.reshape((b, l, 3, n_head, hd))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(bias)?;
        let att = softmax_last_dim(&scores)?.matmul(&v)?;
        let att = att.transpose(1, 2)?.reshape((b, l, d))?;
        let h = (x + self.proj.forward(&att)?)?;
        let m = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&h)?)?.gelu()?)?;
        Ok((h + m)?)
    }
}

pub struct BuiltinTextEncoder {
    cfg: BuiltinConfig,
    vocab: WordVocab,
    tok_embeddings: Tensor,
    pos_embeddings: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    device: Device,
}

impl BuiltinTextEncoder {
    /// Build on `vb` (the caller picks the prefix, e.g. `vb.pp("text_encoder")`). Variables:
    /// `tok_embeddings.weight`, `pos_embeddings`, `layers.{i}.{norm1,attn.qkv,attn.proj,norm2,
    /// mlp.fc1,mlp.fc2}.*`, `norm.*`.
    pub fn new(cfg: BuiltinConfig, vocab: WordVocab, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let tok_embeddings = vb.get_with_hints((vocab.len(), cfg.dim), "tok_embeddings.weight", init)?;
        let pos_embeddings = vb.get_with_hints((cfg.max_len, cfg.dim), "pos_embeddings", init)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(&cfg, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(cfg.dim, cfg.norm_eps, true, vb.pp("norm"))?;
        Ok(Self { cfg, vocab, tok_embeddings, pos_embeddings, blocks, norm, device: vb.device().clone() })
    }

    /// Rebuild from checkpoint metadata written by [`Self::metadata`].
    pub fn from_metadata(meta: &BTreeMap<String, String>, vb: VarBuilder) -> Result<Self> {
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| Error::invalid("checkpoint metadata", format!("no `{k}` entry (not a built-in text encoder checkpoint?)")))
        };
        let cfg: BuiltinConfig = serde_json::from_str(get(CONFIG_KEY)?)
            .map_err(|e| Error::invalid("checkpoint metadata", format!("`{CONFIG_KEY}`: {e}")))?;
        let vocab = WordVocab::from_json(get(VOCAB_KEY)?)?;
        Self::new(cfg, vocab, vb)
    }

    /// Config and vocabulary as checkpoint metadata entries.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let cfg = serde_json::to_string(&self.cfg).unwrap_or_default();
        BTreeMap::from([(CONFIG_KEY.to_string(), cfg), (VOCAB_KEY.to_string(), self.vocab.to_json())])
    }

    pub fn config(&self) -> &BuiltinConfig {
        &self.cfg
    }

    pub fn vocab(&self) -> &WordVocab {
        &self.vocab
    }

    /// The words of `prompt` this encoder does not know (each once, in order of appearance):
    /// they all read as `<unk>`.
    pub fn unknown_words(&self, prompt: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for w in super::vocab::split_words(prompt) {
            if self.vocab.id(&w) == super::vocab::UNK_ID && !out.contains(&w) {
                out.push(w);
            }
        }
        out
    }

    /// The words this encoder knows (`<pad>` and `<unk>` left out).
    pub fn known_words(&self) -> Vec<&str> {
        self.vocab.words().iter().skip(2).map(|w| w.as_str()).collect()
    }

    pub fn padding(&self) -> Padding {
        Padding::Right
    }

    /// Right-padded token ids `(B, len)` u32 and mask `(B, len)` f32 with `len` = the longest
    /// prompt (at least 1, at most `max_len`).
    pub fn tokenize(&self, prompts: &[String]) -> Result<(Tensor, Tensor)> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.vocab.encode(p, self.cfg.max_len)).collect();
        let len = ids.iter().map(|v| v.len()).max().unwrap_or(0).max(1);
        let mut flat = Vec::with_capacity(ids.len() * len);
        let mut mask = Vec::with_capacity(ids.len() * len);
        for v in &ids {
            flat.extend(v.iter().copied().chain(std::iter::repeat(PAD_ID)).take(len));
            mask.extend((0..len).map(|j| if j < v.len() { 1f32 } else { 0f32 }));
        }
        let b = prompts.len();
        Ok((Tensor::from_vec(flat, (b, len), &self.device)?, Tensor::from_vec(mask, (b, len), &self.device)?))
    }

    /// Features `(B, L, dim)` for ids `(B, L)` with mask `(B, L)` (1 = token, 0 = padding);
    /// padded rows are zero. Differentiable with respect to every variable.
    pub fn forward_ids(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.cfg.max_len {
            return Err(Error::invalid("text ids", format!("length {l} exceeds max_len {}", self.cfg.max_len)));
        }
        let mask = mask.to_dtype(DType::F32)?;
        let x = self.tok_embeddings.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, self.cfg.dim))?;
        let mut x = x.broadcast_add(&self.pos_embeddings.narrow(0, 0, l)?)?;
        // Padded keys get a large negative bias; a finite value keeps an all-padding row finite.
        let bias = ((1.0 - &mask)? * -1e9)?.reshape((b, 1, 1, l))?;
        for blk in &self.blocks {
            x = blk.forward(&x, &bias, self.cfg.n_head)?;
        }
        let x = self.norm.forward(&x)?;
        Ok(x.broadcast_mul(&mask.unsqueeze(2)?)?)
    }
}

impl TextEncoder for BuiltinTextEncoder {
    fn dim(&self) -> usize {
        self.cfg.dim
    }

    fn max_len(&self) -> usize {
        self.cfg.max_len
    }

    fn encode(&self, prompts: &[String]) -> Result<(Tensor, Tensor)> {
        let (ids, mask) = self.tokenize(prompts)?;
        let feats = self.forward_ids(&ids, &mask)?;
        let extra = self.cfg.max_len - ids.dim(1)?;
        Ok((feats.pad_with_zeros(1, 0, extra)?, mask.pad_with_zeros(1, 0, extra)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{named_vars, vars_without_grad};
    use candle_core::IndexOp;
    use candle_nn::VarMap;

    fn tiny() -> (VarMap, BuiltinTextEncoder) {
        let corpus = ["a dog on the left of a cat", "a mug beside a dog", "a cat under the mug"];
        let vocab = WordVocab::build(&corpus, 1, 100);
        let cfg = BuiltinConfig { dim: 16, n_layer: 2, n_head: 2, max_len: 8, mlp_ratio: 2, norm_eps: 1e-5 };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let enc = BuiltinTextEncoder::new(cfg, vocab, vb.pp("text_encoder")).unwrap();
        (vm, enc)
    }

    #[test]
    fn builtin_shapes_padding_and_independence() {
        let (_vm, enc) = tiny();
        let prompts = vec!["A dog on the left of a cat".to_string(), "mug".to_string(), "".to_string()];
        let (f, m) = enc.encode(&prompts).unwrap();
        assert_eq!(f.dims(), &[3, 8, 16]);
        assert_eq!(m.to_vec2::<f32>().unwrap()[1], vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let rows = f.abs().unwrap().sum(2).unwrap().to_vec2::<f32>().unwrap();
        for (b, n) in [(0usize, 8usize), (1, 1), (2, 0)] {
            assert!(rows[b][..n].iter().all(|&r| r > 0.0), "{rows:?}");
            assert!(rows[b][n..].iter().all(|&r| r == 0.0), "{rows:?}");
        }
        // Padding does not leak into valid rows: "mug" alone gives the same features.
        let (alone, _) = enc.encode(&prompts[1..2]).unwrap();
        let a = alone.i((0, 0)).unwrap().to_vec1::<f32>().unwrap();
        let b = f.i((1, 0)).unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{a:?} vs {b:?}");
        assert!(f.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn builtin_every_variable_gets_a_gradient() {
        let (vm, enc) = tiny();
        let prompts = vec!["a dog on the left of a cat".to_string(), "the mug".to_string()];
        let (f, _) = enc.encode(&prompts).unwrap();
        let w = Tensor::randn(0f32, 1.0, f.dims(), &Device::Cpu).unwrap();
        let loss = (f * w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = named_vars(&vm);
        assert_eq!(vars.len(), 2 + 2 * 12 + 2);
        assert!(vars.iter().all(|(n, _)| n.starts_with("text_encoder.")));
        assert_eq!(vars_without_grad(&vars, &grads).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn builtin_metadata_roundtrip() {
        let (vm, enc) = tiny();
        let meta = enc.metadata();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let again = BuiltinTextEncoder::from_metadata(&meta, vb.pp("text_encoder")).unwrap();
        assert_eq!(again.config(), enc.config());
        assert_eq!(again.vocab(), enc.vocab());
        let p = vec!["a cat".to_string()];
        assert_eq!(
            again.encode(&p).unwrap().0.to_vec3::<f32>().unwrap(),
            enc.encode(&p).unwrap().0.to_vec3::<f32>().unwrap()
        );
        assert!(BuiltinTextEncoder::from_metadata(&BTreeMap::new(), vb).is_err());
        let bad = BuiltinConfig { dim: 15, ..BuiltinConfig::default() };
        assert!(bad.validate().is_err());
        let huge = BuiltinConfig { n_layer: 100_000_000, ..BuiltinConfig::default() };
        let e = huge.validate().unwrap_err().to_string();
        assert!(e.contains("n_layer") && e.contains("limit"), "{e}");
    }

    #[test]
    fn unknown_words_are_listed_once() {
        let (_vm, enc) = tiny();
        assert_eq!(enc.unknown_words("A zebra next to a dog, a ZEBRA!"), vec!["zebra".to_string(), "next".into(), "to".into()]);
        assert!(enc.unknown_words("a dog beside a mug").is_empty());
        assert!(enc.known_words().contains(&"dog") && !enc.known_words().contains(&"<unk>"));
    }
}

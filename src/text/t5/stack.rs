//! The T5 encoder stack with an attention mask, on the Hugging Face `T5EncoderModel` keys
//! (`shared`, `encoder.block.{i}.layer.{0,1}...`, `encoder.final_layer_norm`).
//!
//! It computes what Hugging Face's encoder computes for a batch of ids and an attention mask:
//! the masked keys get no attention weight (every query, a padded one included, attends to the
//! valid tokens only), the relative position bias is the bucketed one of block 0 shared by
//! every block, attention is unscaled, layer norms are T5's (no mean, no bias, in f32) and the
//! softmax runs in f32. Frozen (inference only), so candle's fused softmax is fine here.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::t5::Config;

/// T5's layer norm: `x / sqrt(mean(x^2) + eps) * weight`, computed in f32.
struct LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(d, "weight")?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        Ok(y.broadcast_mul(&self.weight.to_dtype(dtype)?)?)
    }
}

fn linear(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((d_out, d_in), "weight")?, None))
}

/// `DenseReluDense`: `wo(act(wi x))`, or `wo(act(wi_0 x) * wi_1 x)` when gated.
struct FeedForward {
    wi: Linear,
    gate: Option<Linear>,
    wo: Linear,
    act: candle_nn::Activation,
}

impl FeedForward {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let gated = cfg.feed_forward_proj.gated;
        Ok(Self {
            wi: linear(cfg.d_model, cfg.d_ff, vb.pp(if gated { "wi_0" } else { "wi" }))?,
            gate: if gated { Some(linear(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?) } else { None },
            wo: linear(cfg.d_ff, cfg.d_model, vb.pp("wo"))?,
            act: cfg.feed_forward_proj.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.wi.forward(x)?)?;
        let h = match &self.gate {
            Some(g) => (h * g.forward(x)?)?,
            None => h,
        };
        Ok(self.wo.forward(&h)?)
    }
}

struct Block {
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: LayerNorm,
    ff: FeedForward,
}

impl Block {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let sa = vb.pp("layer.0");
        let att = sa.pp("SelfAttention");
        Ok(Self {
            attn_norm: LayerNorm::load(cfg.d_model, cfg.layer_norm_epsilon, sa.pp("layer_norm"))?,
            q: linear(cfg.d_model, inner, att.pp("q"))?,
            k: linear(cfg.d_model, inner, att.pp("k"))?,
            v: linear(cfg.d_model, inner, att.pp("v"))?,
            o: linear(inner, cfg.d_model, att.pp("o"))?,
            ff_norm: LayerNorm::load(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("layer.1").pp("layer_norm"))?,
            ff: FeedForward::load(cfg, vb.pp("layer.1").pp("DenseReluDense"))?,
        })
    }

    /// `x + o(attn(norm(x)))`, then `+ ff(norm(.))`; `bias` (B or 1, H, L, L) holds the position
    /// bias plus the mask.
    fn forward(&self, x: &Tensor, bias: &Tensor, heads: usize, d_kv: usize) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let h = self.attn_norm.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, l, heads, d_kv))?.transpose(1, 2)?.contiguous()?) };
        let q = split(self.q.forward(&h)?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        // No 1/sqrt(d_kv) scaling in T5.
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.broadcast_add(bias)?;
        let w = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let a = w.matmul(&v)?.transpose(1, 2)?.reshape((b, l, heads * d_kv))?;
        let x = (x + self.o.forward(&a)?)?;
        let y = self.ff.forward(&self.ff_norm.forward(&x)?)?;
        Ok((x + y)?)
    }
}

/// The encoder: token embedding, blocks, final layer norm.
pub struct Stack {
    shared: Tensor,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    /// `relative_attention_bias` of block 0: (buckets, heads).
    rel_bias: Tensor,
    heads: usize,
    d_kv: usize,
    buckets: usize,
    max_distance: usize,
}

impl Stack {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if cfg.num_layers == 0 || cfg.num_heads == 0 || cfg.relative_attention_num_buckets < 4 {
            return Err(Error::invalid("T5 config", "num_layers, num_heads and relative_attention_num_buckets (>= 4) must be positive"));
        }
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers).map(|i| Block::load(cfg, enc.pp("block").pp(i))).collect::<Result<Vec<_>>>()?;
        let rel_bias = enc
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get((cfg.relative_attention_num_buckets, cfg.num_heads), "weight")?;
        Ok(Self {
            shared: vb.pp("shared").get((cfg.vocab_size, cfg.d_model), "weight")?,
            blocks,
            final_norm: LayerNorm::load(cfg.d_model, cfg.layer_norm_epsilon, enc.pp("final_layer_norm"))?,
            rel_bias,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// Hugging Face's bidirectional relative position bucket of `key - query`. The logarithmic
    /// part is computed in f32 as torch does (`log(n.float() / max_exact) / log(max_distance /
    /// max_exact) * (buckets - max_exact)`, truncated).
    fn bucket(&self, rel: i64) -> usize {
        let half = self.buckets / 2;
        let offset = if rel > 0 { half } else { 0 };
        let n = rel.unsigned_abs() as usize;
        let max_exact = half / 2;
        if n < max_exact {
            return offset + n;
        }
        let scale = ((self.max_distance as f64 / max_exact as f64).ln()) as f32;
        let large = ((n as f32 / max_exact as f32).ln() / scale * (half - max_exact) as f32) as usize;
        offset + (max_exact + large).min(half - 1)
    }

    /// The position bias (1, H, L, L) f32.
    fn position_bias(&self, l: usize, device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = (0..l).flat_map(|q| (0..l).map(move |k| (q, k))).map(|(q, k)| self.bucket(k as i64 - q as i64) as u32).collect();
        let ids = Tensor::from_vec(ids, l * l, device)?;
        let bias = self.rel_bias.to_dtype(DType::F32)?.index_select(&ids, 0)?; // (L*L, H)
        Ok(bias.reshape((l, l, self.heads))?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
    }

    /// `last_hidden_state` (B, L, D) in the weights' dtype for ids (B, L) u32 and an optional
    /// attention mask (B, L) (1 = token, 0 = padding; any dtype).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mut x = self.shared.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, ()))?;
        let mut bias = self.position_bias(l, ids.device())?;
        if let Some(m) = mask {
            // Hugging Face adds (1 - mask) * finfo.min to the scores of masked keys.
            let add = ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)?) * f32::MIN as f64)?.reshape((b, 1, 1, l))?;
            bias = bias.broadcast_add(&add)?;
        }
        for block in &self.blocks {
            x = block.forward(&x, &bias, self.heads, self.d_kv)?;
        }
        self.final_norm.forward(&x)
    }
}

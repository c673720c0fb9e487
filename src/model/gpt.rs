//! The LlamaGen GPT with TokenAR's additions. The struct tree is the checkpoint's key tree:
//! `tok_embeddings`, `cls_embedding` (`CaptionEmbedder`: `cap_proj.fc1`, `cap_proj.fc2`,
//! `uncond_embedding`), `layers.N` (`Block`: `attention` (`Attention`: `wqkv`, `wo`),
//! `feed_forward` (`FeedForward`: `w1`, `w2`, `w3`), `attention_norm`, `ffn_norm`), `norm`,
//! `output`, and the additions (`ref_index_embeddings`, `instruct_token_embeddings`,
//! `cell_embeddings`, `img_uncond_embedding`, `alignment`).
//!
//! Two execution paths share every weight: the training path (`forward_train`) uses
//! elementary-op compositions so that every parameter receives a gradient, with seeded
//! dropout; the inference path ([`TokenAr::start`] and the [`Session`](super::Session) of
//! `session.rs`) uses fused RMSNorm, softmax, SwiGLU and
//! RoPE kernels and a KV cache. A test checks that both give the same logits. Both read the
//! linear layers' weights where they lie ([`Weight`], `(out, in)`): no inference copy is made,
//! and [`TokenAr::convert_weights`] stores them as bf16, f16 or Q8_0 for inference.

use super::condition::Condition;
use super::config::{Dropouts, GptConfig};
use super::cell_embedding::CellEmbedding;
use super::index_embedding::IndexEmbedding;
use super::instruct_tokens::InstructTokens;
use crate::error::{Error, Result};
use crate::nn::{linear, rope, LayerCache, Weight, WeightDtype};
use crate::layout::{Layout, SegmentKind};
use crate::util::Rng;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::Rng as _;

const STD: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// Training outputs: the final-norm features at the loss positions (B, n_loss, dim) (the
/// head's input: [`TokenAr::token_nll`], [`TokenAr::logits`]), their targets (B, n_loss) u32,
/// and the features of the positions that predict the target image (for the distillation head).
pub struct TrainOutput {
    pub hidden: Tensor,
    pub targets: Tensor,
    pub target_features: Tensor,
}

/// Per-forward switches: differentiable ops, and dropout with a seeded RNG.
pub(crate) struct Ctx<'r> {
    pub differentiable: bool,
    pub rng: Option<&'r mut Rng>,
}

impl Ctx<'_> {
    /// A dropout mask of `x`'s shape (entries 0 or 1 / (1 - p)); `None` without an RNG or at p = 0.
    fn dropout_mask(&mut self, x: &Tensor, p: f32) -> Result<Option<Tensor>> {
        let rng = match self.rng.as_deref_mut() {
            Some(r) if p > 0.0 => r,
            _ => return Ok(None),
        };
        let mask = crate::nn::dropout_mask_values(x.elem_count(), p, rng.random());
        Ok(Some(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?))
    }

    fn dropout(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        match self.dropout_mask(x, p)? {
            Some(m) => crate::nn::mul_mask(x, &m),
            None => Ok(x.clone()),
        }
    }

    /// The residual connection `x + dropout(y)`.
    fn residual(&mut self, x: &Tensor, y: &Tensor, p: f32) -> Result<Tensor> {
        match self.dropout_mask(y, p)? {
            Some(m) => crate::nn::add_masked(x, y, &m),
            None => Ok((x + y)?),
        }
    }
}

struct Norm {
    weight: Tensor,
    eps: f64,
}

impl Norm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?, eps })
    }
    fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable {
            crate::nn::RmsNorm { weight: self.weight.clone(), eps: self.eps }.forward(x)
        } else {
            Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)?)
        }
    }
}

/// Rotation tables and additive attention mask for one forward.
pub(crate) struct AttnInputs<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Broadcastable to (B, H, S, L); `None`: no masking needed.
    pub mask: Option<&'a Tensor>,
    /// With a KV cache on the CPU: the same inputs for the fused cached attention (causal
    /// implied, `mask` then unused).
    pub cached: Option<crate::nn::CachedStep<'a>>,
}

/// A linear layer on either path: the weight where it lies on the inference path (any
/// [`WeightDtype`]), the differentiable op on the training path.
fn project(x: &Tensor, w: &Weight, infer: bool) -> Result<Tensor> {
    if infer {
        w.forward(x)
    } else {
        linear(x, w.tensor()?)
    }
}

/// Multi-head self-attention with 2D RoPE (`layers.N.attention`): the fused query, key and
/// value projection `wqkv` and the output projection `wo`.
struct Attention {
    wqkv: Weight,
    wo: Weight,
    n_head: usize,
}

impl Attention {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            wqkv: Weight::Dense(vb.pp("wqkv").get_with_hints((3 * d, d), "weight", STD)?),
            wo: Weight::Dense(vb.pp("wo").get_with_hints((d, d), "weight", STD)?),
            n_head: cfg.n_head,
        })
    }

    /// Attention of the normalised `xn` (B, T, dim), appending to `cache` when given: the
    /// output projection of the last `keep` positions, (B, keep, dim).
    #[allow(clippy::too_many_arguments)]
    fn forward(&self, xn: &Tensor, att: &AttnInputs, cache: Option<&mut LayerCache>, ctx: &mut Ctx, drop: &Dropouts, infer: bool, keep: usize) -> Result<Tensor> {
        let (h, hd) = (self.n_head, xn.dim(2)? / self.n_head);
        let qkv = project(xn, &self.wqkv, infer)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Training without attention dropout: one fused op from the projection to the heads'
        // outputs (RoPE, scaling, scores, softmax, values), with no (B, H, S, S) tensor kept.
        // (Not while the attention is recorded: the fused kernel keeps no probabilities.)
        let fusable = ctx.differentiable && cache.is_none() && (drop.attn == 0.0 || ctx.rng.is_none()) && !crate::nn::attention_record::active();
        let (fused, cache) = match (fusable, cache, &att.cached) {
            (true, c, _) => (crate::nn::attention_qkv(&qkv, att.cos, att.sin, scale, h, att.mask)?, c),
            (false, Some(c), Some(step)) if drop.attn == 0.0 || ctx.rng.is_none() => (c.attend(&qkv, h, scale, step, keep)?, Some(c)),
            (false, c, _) => (None, c),
        };
        let y = match fused {
            Some(y) => y,
            None => self.composed(&qkv, scale, att, cache, ctx, drop)?,
        };
        let y = if y.dim(1)? > keep { y.narrow(1, y.dim(1)? - keep, keep)? } else { y };
        project(&y, &self.wo, infer)
    }

    /// Attention from elementary ops (inference with a KV cache, attention dropout, devices
    /// without the fused kernel): `qkv` (B, S, 3 * dim) -> (B, S, dim); queries scaled by
    /// `scale`.
    fn composed(&self, qkv: &Tensor, scale: f64, att: &AttnInputs, cache: Option<&mut LayerCache>, ctx: &mut Ctx, drop: &Dropouts) -> Result<Tensor> {
        let (b, s, w) = qkv.dims3()?;
        let (h, hd) = (self.n_head, w / (3 * self.n_head));
        let recorded = crate::nn::attention_record::active().then(|| qkv.clone());
        let qkv = qkv.reshape((b, s, 3, h, hd))?.permute((2, 0, 3, 1, 4))?.contiguous()?;
        let q = rope::apply(&qkv.get(0)?, att.cos, att.sin, ctx.differentiable)?;
        let q = (q * scale)?;
        let k = rope::apply(&qkv.get(1)?, att.cos, att.sin, ctx.differentiable)?;
        let v = qkv.get(2)?;
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let scores = q.matmul(&k.t()?)?;
        let probs = if ctx.differentiable || scores.device().is_cpu() {
            // On the CPU the fused masked softmax also serves inference (vectorised exp).
            crate::nn::masked_softmax_last_dim(&scores, att.mask)?
        } else {
            let scores = match att.mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        if let Some(qkv) = &recorded {
            crate::nn::attention_record::push(qkv, &probs);
        }
        let probs = ctx.dropout(&probs, drop.attn)?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * hd))?)
    }

    fn weights_mut(&mut self) -> [&mut Weight; 2] {
        [&mut self.wqkv, &mut self.wo]
    }

    fn weights(&self) -> [&Weight; 2] {
        [&self.wqkv, &self.wo]
    }
}

/// The SwiGLU feed-forward network (`layers.N.feed_forward`): `w2(silu(w1 x) * w3 x)`.
struct FeedForward {
    w1: Weight,
    w2: Weight,
    w3: Weight,
}

impl FeedForward {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.dim, cfg.ffn_hidden());
        Ok(Self {
            w1: Weight::Dense(vb.pp("w1").get_with_hints((f, d), "weight", STD)?),
            w2: Weight::Dense(vb.pp("w2").get_with_hints((d, f), "weight", STD)?),
            w3: Weight::Dense(vb.pp("w3").get_with_hints((f, d), "weight", STD)?),
        })
    }

    /// The network on the normalised `hn` (B, T, dim); FFN dropout on the gate in training.
    fn forward(&self, hn: &Tensor, ctx: &mut Ctx, drop: &Dropouts, infer: bool) -> Result<Tensor> {
        if infer {
            let g = crate::nn::swiglu(&self.w1.forward(hn)?, &self.w3.forward(hn)?)?;
            return self.w2.forward(&g);
        }
        let (gate, up) = (linear(hn, self.w1.tensor()?)?, linear(hn, self.w3.tensor()?)?);
        let mask = ctx.dropout_mask(&gate, drop.ffn)?;
        let g = crate::nn::swiglu_masked(&gate, &up, mask.as_ref())?;
        linear(&g, self.w2.tensor()?)
    }

    fn weights_mut(&mut self) -> [&mut Weight; 3] {
        [&mut self.w1, &mut self.w2, &mut self.w3]
    }

    fn weights(&self) -> [&Weight; 3] {
        [&self.w1, &self.w2, &self.w3]
    }
}

/// One transformer block (`layers.N`): `h = x + attention(attention_norm(x))`, then
/// `h + feed_forward(ffn_norm(h))`, with residual dropout in training.
struct Block {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm: Norm,
    ffn_norm: Norm,
}

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention: Attention::new(cfg, vb.pp("attention"))?,
            feed_forward: FeedForward::new(cfg, vb.pp("feed_forward"))?,
            attention_norm: Norm::new(cfg.dim, cfg.norm_eps, vb.pp("attention_norm"))?,
            ffn_norm: Norm::new(cfg.dim, cfg.norm_eps, vb.pp("ffn_norm"))?,
        })
    }

    /// The block over `x` (B, T, dim); with `keep`, the outputs of the last `keep` positions
    /// only (every position's keys and values are still cached): the attention output,
    /// projection and MLP of the others are skipped.
    #[allow(clippy::too_many_arguments)]
    fn forward(&self, x: &Tensor, att: &AttnInputs, cache: Option<&mut LayerCache>, ctx: &mut Ctx, drop: &Dropouts, infer: bool, keep: Option<usize>) -> Result<Tensor> {
        let t = x.dim(1)?;
        let keep = keep.unwrap_or(t);
        if keep == 0 || keep > t {
            return Err(Error::invalid("block", format!("the outputs of {keep} of {t} positions asked for")));
        }
        let xn = self.attention_norm.forward(x, ctx.differentiable)?;
        let a = self.attention.forward(&xn, att, cache, ctx, drop, infer, keep)?;
        let x = if t > keep { x.narrow(1, t - keep, keep)? } else { x.clone() };
        let h = ctx.residual(&x, &a, drop.resid)?;
        let f = self.feed_forward.forward(&self.ffn_norm.forward(&h, ctx.differentiable)?, ctx, drop, infer)?;
        ctx.residual(&h, &f, drop.resid)
    }

    /// The linear layers' weights (what [`TokenAr::convert_weights`] converts).
    fn weights_mut(&mut self) -> impl Iterator<Item = &mut Weight> {
        let Self { attention, feed_forward, .. } = self;
        attention.weights_mut().into_iter().chain(feed_forward.weights_mut())
    }

    fn weights(&self) -> impl Iterator<Item = &Weight> {
        self.attention.weights().into_iter().chain(self.feed_forward.weights())
    }
}

/// The caption embedder (`cls_embedding`): dropped captions replaced by the learned
/// `uncond_embedding` (a buffer in the reference code), padded rows zeroed, then the MLP
/// `cap_proj` (`fc1`, GELU, `fc2`) from the text features' width to the model's.
struct CaptionEmbedder {
    fc1: Tensor,
    fc2: Tensor,
    uncond_embedding: Tensor,
}

impl CaptionEmbedder {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        let proj = vb.pp("cap_proj");
        let buf_init = Init::Randn { mean: 0.0, stdev: 1.0 / (cfg.caption_dim as f64).sqrt() };
        Ok(Self {
            fc1: proj.pp("fc1").get_with_hints((d, cfg.caption_dim), "weight", STD)?,
            fc2: proj.pp("fc2").get_with_hints((d, d), "weight", STD)?,
            uncond_embedding: vb.get_with_hints((cfg.caption_len, cfg.caption_dim), "uncond_embedding", buf_init)?,
        })
    }

    /// Caption tokens (B, caption_len, dim) from text features (B, caption_len, caption_dim):
    /// rows flagged in `drop` take the uncond embedding; `mask` (B, caption_len) zeroes padded
    /// positions (LlamaGen).
    fn forward(&self, text: &Tensor, drop: &[bool], mask: Option<&Tensor>) -> Result<Tensor> {
        let mut text = blend_rows(text, &self.uncond_embedding.detach(), drop)?;
        if let Some(m) = mask {
            text = text.broadcast_mul(&m.to_dtype(text.dtype())?.unsqueeze(2)?)?;
        }
        linear(&linear(&text, &self.fc1)?.gelu()?, &self.fc2)
    }

    /// The text features of a dropped caption, (b, caption_len, caption_dim).
    fn uncond_text(&self, b: usize) -> Result<Tensor> {
        let (l, c) = self.uncond_embedding.dims2()?;
        Ok(self.uncond_embedding.unsqueeze(0)?.broadcast_as((b, l, c))?.contiguous()?)
    }
}

/// Per-row blend: rows flagged in `drop` take `null` (broadcast), others keep `x`.
fn blend_rows(x: &Tensor, null: &Tensor, drop: &[bool]) -> Result<Tensor> {
    if !drop.iter().any(|d| *d) {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let keep: Vec<f32> = drop.iter().map(|d| if *d { 0.0 } else { 1.0 }).collect();
    let keep = Tensor::from_vec(keep, (b, 1, 1), x.device())?.to_dtype(x.dtype())?;
    let dropk = (1.0 - &keep)?;
    Ok((x.broadcast_mul(&keep)? + null.unsqueeze(0)?.broadcast_mul(&dropk)?)?)
}

/// The TokenAR GPT (LlamaGen backbone plus index embedding, instruct tokens, ITD layout).
pub struct TokenAr {
    cfg: GptConfig,
    tok_embeddings: Tensor,
    cls_embedding: CaptionEmbedder,
    layers: Vec<Block>,
    norm: Norm,
    output: Weight,
    index_embedding: Option<IndexEmbedding>,
    cell_embedding: Option<CellEmbedding>,
    instruct: Option<InstructTokens>,
    img_uncond: Option<Tensor>,
    alignment: Option<super::alignment::Alignment>,
    device: Device,
}

/// Variables that are buffers in the reference code (never trained; detached where used).
pub const BUFFERS: [&str; 2] = ["cls_embedding.uncond_embedding", "img_uncond_embedding"];

impl TokenAr {
    /// Build the model; variables are created through `vb` under the reference key names.
    /// With a `VarMap`, [`init_weights`](super::init_weights) gives a seeded initialisation.
    pub fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.dim;
        let layers = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let img_uncond = if cfg.img_uncond {
            let init = Init::Randn { mean: 0.0, stdev: 1.0 / (d as f64).sqrt() };
            Some(vb.get_with_hints((cfg.null_image_rows(), d), "img_uncond_embedding", init)?)
        } else {
            None
        };
        let alignment = match cfg.align_dim {
            Some(a) => Some(super::alignment::Alignment::new(d, a, vb.pp("alignment"))?),
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            tok_embeddings: vb.pp("tok_embeddings").get_with_hints((cfg.vocab_size, d), "weight", STD)?,
            cls_embedding: CaptionEmbedder::new(cfg, vb.pp("cls_embedding"))?,
            layers,
            norm: Norm::new(d, cfg.norm_eps, vb.pp("norm"))?,
            // LlamaGen zero-initialises the output head.
            output: Weight::Dense(vb.pp("output").get_with_hints((cfg.vocab_size, d), "weight", Init::Const(0.0))?),
            index_embedding: if cfg.index_embedding {
                Some(IndexEmbedding::new(cfg.max_refs + 1, d, vb.pp("ref_index_embeddings"))?)
            } else {
                None
            },
            cell_embedding: if cfg.cell_embedding {
                Some(CellEmbedding::new(cfg.grid, d, vb.pp("cell_embeddings"))?)
            } else {
                None
            },
            instruct: if cfg.n_instruct > 0 {
                Some(InstructTokens::new(cfg.n_instruct, d, vb.pp("instruct_token_embeddings"))?)
            } else {
                None
            },
            img_uncond,
            alignment,
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The layout of `cond`'s sequence (validates the shapes of `cond`).
    pub fn layout_for(&self, cond: &Condition) -> Result<Layout> {
        let (b, n, rhw) = cond.refs.dims3()?;
        let want_hw = self.cfg.image_tokens();
        if rhw != self.cfg.ref_tokens() && n > 0 {
            return Err(Error::invalid(
                "condition",
                format!("reference codes have {rhw} tokens, the model's reference grid {:?} needs {}", self.cfg.ref_grid(), self.cfg.ref_tokens()),
            ));
        }
        let layout = Layout::new(&self.cfg.layout_spec(n))?;
        if layout.ref_slots() != n {
            return Err(Error::invalid(
                "condition",
                format!("the scheme needs {} reference slots but {n} were given; pad them with Condition::pad_refs", layout.ref_slots()),
            ));
        }
        if self.cfg.background && cond.background.dims() != [b, want_hw] {
            return Err(Error::invalid("condition", format!("background codes have shape {:?}, expected [{b}, {want_hw}]", cond.background.dims())));
        }
        let (tb, tl, tc) = cond.text.dims3()?;
        if (tb, tl, tc) != (b, self.cfg.caption_len, self.cfg.caption_dim) {
            return Err(Error::invalid(
                "condition",
                format!("text features have shape {:?}, expected [{b}, {}, {}]", cond.text.dims(), self.cfg.caption_len, self.cfg.caption_dim),
            ));
        }
        for (what, v) in [("drop_text", &cond.drop_text), ("drop_image", &cond.drop_image)] {
            if !v.is_empty() && v.len() != b {
                return Err(Error::invalid("condition", format!("{what} has {} flags for {b} rows", v.len())));
            }
        }
        Ok(layout)
    }

    /// Embeddings of the prefix (conditions, text, instruct): (B, prefix_len, dim).
    pub(crate) fn embed_prefix(&self, cond: &Condition, layout: &Layout) -> Result<Tensor> {
        let b = cond.batch()?;
        let d = self.cfg.dim;
        let mut parts: Vec<Tensor> = Vec::new();
        // Condition images in layout order, with their img_uncond rows and index ids.
        let mut codes = Vec::new();
        let mut null_rows: Vec<u32> = Vec::new();
        let mut ids = Vec::new();
        for seg in layout.segments().iter().filter(|s| s.kind.is_image_condition()) {
            let (c, slot) = match seg.kind {
                SegmentKind::Ref(i) => (cond.refs.narrow(1, i, 1)?.squeeze(1)?, Some(i)),
                _ => (cond.background.clone(), None),
            };
            let first_row = self.cfg.null_image_offset(slot);
            codes.push(c);
            null_rows.extend((first_row..first_row + seg.len).map(|r| r as u32));
            ids.extend_from_slice(&layout.index_ids()[seg.start..seg.start + seg.len]);
        }
        if !codes.is_empty() {
            let codes = Tensor::cat(&codes, 1)?;
            let n = codes.dim(1)?;
            let mut x = self.tok_embeddings.index_select(&codes.to_dtype(DType::U32)?.flatten_all()?, 0)?.reshape((b, n, d))?;
            // The index embedding first, then a dropped image's rows replaced whole by the null
            // image (as the reference's training forward does: the null image carries no index).
            if let Some(ie) = &self.index_embedding {
                x = ie.add(&x, &ids)?;
            }
            if cond.drop_image.iter().any(|f| *f) {
                let null = self.img_uncond.as_ref().ok_or_else(|| {
                    Error::invalid("condition", "image dropout needs a model with img_uncond_embedding")
                })?;
                let rows = Tensor::from_vec(null_rows, n, &self.device)?;
                x = blend_rows(&x, &null.detach().index_select(&rows, 0)?, &cond.drop_image)?;
            }
            parts.push(x);
        }
        parts.push(self.cls_embedding.forward(&cond.text, &cond.drop_text, cond.text_mask.as_ref())?);
        if let Some(it) = &self.instruct {
            parts.push(it.forward(b)?);
        }
        let x = Tensor::cat(&parts, 1)?;
        debug_assert_eq!(x.dim(1).ok(), Some(layout.prefix_len()));
        self.add_cells(x, layout, 0)
    }

    /// Add the cell embedding (when the model has one) to `x` (B, T, dim) holding positions
    /// `start .. start + T` of `layout`.
    fn add_cells(&self, x: Tensor, layout: &Layout, start: usize) -> Result<Tensor> {
        match &self.cell_embedding {
            Some(ce) => {
                let t = x.dim(1)?;
                let cells = layout.image_cells().get(start..start + t).ok_or_else(|| {
                    Error::invalid("positions", format!("{start}..{} beyond the layout's {}", start + t, layout.total_len()))
                })?;
                ce.add(&x, cells)
            }
            None => Ok(x),
        }
    }

    /// Embeddings of generated tokens (B, T) fed at positions `start .. start + T` of `layout`.
    pub(crate) fn embed_generated(&self, tokens: &Tensor, layout: &Layout, start: usize) -> Result<Tensor> {
        self.add_cells(self.embed_tokens(tokens)?, layout, start)
    }

    /// The generated token sequence (B, generated_len): ITD copies of the reference slots,
    /// then the target.
    pub fn generated_tokens(&self, cond: &Condition, target: &Tensor, layout: &Layout) -> Result<Tensor> {
        let b = cond.batch()?;
        if target.dims() != [b, self.cfg.image_tokens()] {
            return Err(Error::invalid("target", format!("codes have shape {:?}, expected [{b}, {}]", target.dims(), self.cfg.image_tokens())));
        }
        let target = target.to_dtype(DType::U32)?;
        if self.cfg.itd && layout.ref_slots() > 0 {
            let refs = cond.refs.to_dtype(DType::U32)?.reshape((b, ()))?;
            Ok(Tensor::cat(&[refs, target], 1)?)
        } else {
            Ok(target)
        }
    }

    /// Key-padding mask for the caption (B, 1, 1, len): 0 where attended, -1e9 at padded text.
    /// A finite value keeps fully-padded rows finite; those positions are never attended by
    /// any other query, so their outputs do not matter.
    pub(crate) fn key_padding(&self, cond: &Condition, layout: &Layout, len: usize) -> Result<Option<Tensor>> {
        let Some(m) = &cond.text_mask else { return Ok(None) };
        let m = m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        if m.iter().all(|r| r.iter().all(|v| *v > 0.5)) {
            return Ok(None);
        }
        let text = layout.segment(SegmentKind::Text).map(|s| s.start).unwrap_or(0);
        let b = m.len();
        let mut out = vec![0f32; b * len];
        for (r, row) in m.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                if *v <= 0.5 && text + j < len {
                    out[r * len + text + j] = -1e9;
                }
            }
        }
        Ok(Some(Tensor::from_vec(out, (b, 1, 1, len), &self.device)?))
    }

    /// Additive causal mask (1, 1, s, offset + s) for `s` queries after `offset` cached keys.
    pub(crate) fn causal(&self, s: usize, offset: usize) -> Result<Tensor> {
        let l = offset + s;
        let v: Vec<f32> = (0..s)
            .flat_map(|i| (0..l).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Ok(Tensor::from_vec(v, (1, 1, s, l), &self.device)?)
    }

    /// The transformer blocks over `x` (B, T, dim), caching keys and values when `caches` are
    /// given; with `keep`, the result holds the last `keep` positions only (the last block
    /// skips the rest's attention output, projection and MLP).
    pub(crate) fn run_blocks(
        &self,
        mut x: Tensor,
        att: &AttnInputs,
        caches: Option<&mut [LayerCache]>,
        ctx: &mut Ctx,
        infer: bool,
        keep: Option<usize>,
    ) -> Result<Tensor> {
        let drop = self.cfg.dropouts;
        let mut caches = caches.map(|c| c.iter_mut());
        let n = self.layers.len();
        for (i, blk) in self.layers.iter().enumerate() {
            let cache = caches.as_mut().and_then(|c| c.next());
            x = blk.forward(&x, att, cache, ctx, &drop, infer, if i + 1 == n { keep } else { None })?;
        }
        Ok(x)
    }

    /// Final norm and output head on the inference path (the head in its inference dtype).
    pub(crate) fn head(&self, h: &Tensor) -> Result<Tensor> {
        let hn = self.norm.forward(h, false)?;
        self.output.forward(&hn)
    }

    /// Store the weights of the linear layers (every block's projections and the output head,
    /// all but a few percent of the parameters) as `dtype` for inference; embeddings, norms and
    /// activations stay f32. A model converted to anything but f32 serves inference only
    /// (training needs the f32 variables). Convert at load time and drop the variables' map
    /// for the memory to be freed: the model then holds the only copy.
    pub fn convert_weights(&mut self, dtype: WeightDtype) -> Result<()> {
        for w in self.layers.iter_mut().flat_map(Block::weights_mut) {
            *w = w.convert(dtype)?;
        }
        self.output = self.output.convert(dtype)?;
        Ok(())
    }

    /// Every linear weight that [`TokenAr::convert_weights`] converts, with its variable name
    /// (loaders set them one at a time, each converted as it is read).
    pub fn linear_weights_mut(&mut self) -> Vec<(String, &mut Weight)> {
        let mut out = Vec::with_capacity(5 * self.layers.len() + 1);
        for (i, b) in self.layers.iter_mut().enumerate() {
            let a = format!("layers.{i}.attention");
            let f = format!("layers.{i}.feed_forward");
            out.push((format!("{a}.wqkv.weight"), &mut b.attention.wqkv));
            out.push((format!("{a}.wo.weight"), &mut b.attention.wo));
            out.push((format!("{f}.w1.weight"), &mut b.feed_forward.w1));
            out.push((format!("{f}.w2.weight"), &mut b.feed_forward.w2));
            out.push((format!("{f}.w3.weight"), &mut b.feed_forward.w3));
        }
        out.push(("output.weight".to_string(), &mut self.output));
        out
    }

    /// Whether a variable is one of the linear layers' weights that
    /// [`TokenAr::convert_weights`] stores in a reduced dtype (block projections, output head).
    pub fn is_linear_weight(name: &str) -> bool {
        if name == "output.weight" {
            return true;
        }
        let mut parts = name.split('.');
        matches!(
            (parts.next(), parts.next().map(|i| i.parse::<usize>().is_ok()), parts.next(), parts.next(), parts.next(), parts.next()),
            (Some("layers"), Some(true), Some("attention"), Some("wqkv" | "wo"), Some("weight"), None)
                | (Some("layers"), Some(true), Some("feed_forward"), Some("w1" | "w2" | "w3"), Some("weight"), None)
        )
    }

    /// How the linear layers' weights are stored ([`TokenAr::convert_weights`]).
    pub fn weight_dtype(&self) -> WeightDtype {
        self.output.dtype()
    }

    /// Bytes of weights one decoding step reads: every block's projections and the output head
    /// (the embedding rows it looks up are negligible).
    pub fn step_weight_bytes(&self) -> usize {
        let blocks: usize = self.layers.iter().flat_map(Block::weights).map(Weight::bytes).sum();
        blocks + self.output.bytes()
    }

    pub(crate) fn embed_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let e = self.tok_embeddings.index_select(&tokens.to_dtype(DType::U32)?.flatten_all()?, 0)?;
        Ok(e.reshape((b, t, self.cfg.dim))?)
    }

    /// Teacher-forced forward; see [`TrainOutput`]. `train` enables dropout (drawn from `rng`).
    pub fn forward_train_full(&self, cond: &Condition, target: &Tensor, train: bool, rng: &mut Rng) -> Result<TrainOutput> {
        let layout = self.layout_for(cond)?;
        let gen = self.generated_tokens(cond, target, &layout)?;
        let prefix = self.embed_prefix(cond, &layout)?;
        let g = layout.generated_len();
        let x = Tensor::cat(&[prefix, self.embed_generated(&gen.narrow(1, 0, g - 1)?, &layout, layout.prefix_len())?], 1)?;
        let s = layout.input_len();
        let mut ctx = Ctx { differentiable: true, rng: if train { Some(rng) } else { None } };
        let x = ctx.dropout(&x, self.cfg.dropouts.token)?;
        let (cos, sin) = rope::tables(&layout.rope_cells()[..s], self.cfg.head_dim(), self.cfg.rope_base, &self.device)?;
        let mut mask = self.causal(s, 0)?;
        if let Some(kp) = self.key_padding(cond, &layout, s)? {
            mask = mask.broadcast_add(&kp)?;
        }
        let h = self.run_blocks(x, &AttnInputs { cos: &cos, sin: &sin, mask: Some(&mask), cached: None }, None, &mut ctx, false, None)?;
        let r = layout.loss_range();
        let hn = self.norm.forward(&h.narrow(1, r.start, r.len())?, true)?;
        let hw = self.cfg.image_tokens();
        let target_features = hn.narrow(1, r.len() - hw, hw)?;
        Ok(TrainOutput { hidden: hn, targets: gen, target_features })
    }

    /// Teacher-forced forward: logits at the loss positions (B, n_loss, V) and their targets
    /// (B, n_loss) u32; loss = cross_entropy(logits, targets). Training uses
    /// [`forward_train_full`](Self::forward_train_full) and [`token_nll`](Self::token_nll),
    /// which never materialise the logits as a graph node.
    pub fn forward_train(&self, cond: &Condition, target: &Tensor, train: bool, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
        let o = self.forward_train_full(cond, target, train, rng)?;
        Ok((self.logits(&o.hidden)?, o.targets))
    }

    /// The output head on training features (B, n, dim) -> logits (B, n, V).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, self.output.tensor()?)
    }

    /// Per-token cross-entropy (B, n) of the output head on training features `hidden`
    /// (B, n, dim) against `targets` (B, n): the head and the loss in one op
    /// ([`loss::head_cross_entropy`](super::loss::head_cross_entropy)).
    pub fn token_nll(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, n, d) = hidden.dims3()?;
        if targets.dims() != [b, n] {
            return Err(Error::invalid("token targets", format!("shape {:?} for features {:?}", targets.dims(), hidden.dims())));
        }
        let nll = super::loss::head_cross_entropy(&hidden.reshape((b * n, d))?, self.output.tensor()?, &targets.reshape(b * n)?)?;
        Ok(nll.reshape((b, n))?)
    }

    /// The distillation head (`alignment`, Conv2d k=2 s=2) on target features (B, h*w, dim):
    /// returns (B, h*w/4, align_dim).
    pub fn align(&self, target_features: &Tensor) -> Result<Tensor> {
        let head = self.alignment.as_ref().ok_or_else(|| Error::invalid("alignment", "this configuration has no alignment head"))?;
        head.forward(target_features, self.cfg.grid)
    }

    /// The text features of a dropped caption, (b, caption_len, caption_dim).
    pub fn uncond_text(&self, b: usize) -> Result<Tensor> {
        self.cls_embedding.uncond_text(b)
    }

    /// Every variable name that is a buffer in the reference code (not trained).
    pub fn is_buffer(name: &str) -> bool {
        BUFFERS.contains(&name)
    }

    /// The weights' type.
    pub fn dtype(&self) -> DType {
        self.tok_embeddings.dtype()
    }

    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.cfg.n_layer, self.cfg.n_head, self.cfg.head_dim())
    }
}

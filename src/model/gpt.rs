//! The LlamaGen GPT with TokenAR's additions. Variable names are the reference checkpoint keys.
//!
//! Two execution paths share every weight: the training path (`forward_train`) uses
//! elementary-op compositions so that every parameter receives a gradient, with seeded
//! dropout; the inference path (`start` + [`Session`]) uses fused RMSNorm, softmax, SwiGLU and
//! RoPE kernels and a KV cache. A test checks that both give the same logits. Both read the
//! linear layers' weights where they lie ([`Weight`], `(out, in)`): no inference copy is made,
//! and [`TokenAr::convert_weights`] stores them as bf16, f16 or Q8_0 for inference.

use super::condition::Condition;
use super::config::GptConfig;
use super::cell_embedding::CellEmbedding;
use super::index_embedding::IndexEmbedding;
use super::instruct_tokens::InstructTokens;
use super::kv_cache::{LayerCache, Session};
use super::rope;
use crate::error::{Error, Result};
use crate::nn::{linear, Weight, WeightDtype};
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

struct Block {
    wqkv: Weight,
    wo: Weight,
    w1: Weight,
    w2: Weight,
    w3: Weight,
    attention_norm: Norm,
    ffn_norm: Norm,
    n_head: usize,
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

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.dim, cfg.ffn_hidden());
        let a = vb.pp("attention");
        let ff = vb.pp("feed_forward");
        Ok(Self {
            wqkv: Weight::Dense(a.pp("wqkv").get_with_hints((3 * d, d), "weight", STD)?),
            wo: Weight::Dense(a.pp("wo").get_with_hints((d, d), "weight", STD)?),
            w1: Weight::Dense(ff.pp("w1").get_with_hints((f, d), "weight", STD)?),
            w2: Weight::Dense(ff.pp("w2").get_with_hints((d, f), "weight", STD)?),
            w3: Weight::Dense(ff.pp("w3").get_with_hints((f, d), "weight", STD)?),
            attention_norm: Norm::new(d, cfg.norm_eps, vb.pp("attention_norm"))?,
            ffn_norm: Norm::new(d, cfg.norm_eps, vb.pp("ffn_norm"))?,
            n_head: cfg.n_head,
        })
    }

    /// Attention from elementary ops (inference with a KV cache, attention dropout, devices
    /// without the fused kernel): `qkv` (B, S, 3 * dim) -> (B, S, dim); queries scaled by
    /// `scale`.
    fn attention_composed(&self, qkv: &Tensor, scale: f64, att: &AttnInputs, cache: Option<&mut LayerCache>, ctx: &mut Ctx, drop: &super::config::Dropouts) -> Result<Tensor> {
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

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        att: &AttnInputs,
        cache: Option<&mut LayerCache>,
        ctx: &mut Ctx,
        drop: &super::config::Dropouts,
        infer: bool,
        keep: Option<usize>,
    ) -> Result<Tensor> {
        let (t, d) = (x.dim(1)?, x.dim(2)?);
        // Outputs of the last `keep` positions only (every position's keys and values are
        // still cached): the attention output, projection and MLP of the others are skipped.
        let keep = keep.unwrap_or(t);
        if keep == 0 || keep > t {
            return Err(crate::error::Error::invalid("block", format!("the outputs of {keep} of {t} positions asked for")));
        }
        let (h, hd) = (self.n_head, d / self.n_head);
        let xn = self.attention_norm.forward(x, ctx.differentiable)?;
        let qkv = if infer { self.wqkv.forward(&xn)? } else { linear(&xn, self.wqkv.tensor()?)? };
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
            None => self.attention_composed(&qkv, scale, att, cache, ctx, drop)?,
        };
        let last = |v: &Tensor| -> Result<Tensor> { Ok(if v.dim(1)? > keep { v.narrow(1, v.dim(1)? - keep, keep)? } else { v.clone() }) };
        let (x, y) = (last(x)?, last(&y)?);
        let hres = if infer { (&x + self.wo.forward(&y)?)? } else { ctx.residual(&x, &linear(&y, self.wo.tensor()?)?, drop.resid)? };
        let hn = self.ffn_norm.forward(&hres, ctx.differentiable)?;
        if infer {
            let g = crate::nn::swiglu(&self.w1.forward(&hn)?, &self.w3.forward(&hn)?)?;
            return Ok((hres + self.w2.forward(&g)?)?);
        }
        let (gate, up) = (linear(&hn, self.w1.tensor()?)?, linear(&hn, self.w3.tensor()?)?);
        let mask = ctx.dropout_mask(&gate, drop.ffn)?;
        let g = crate::nn::swiglu_masked(&gate, &up, mask.as_ref())?;
        ctx.residual(&hres, &linear(&g, self.w2.tensor()?)?, drop.resid)
    }
}

/// The TokenAR GPT (LlamaGen backbone plus index embedding, instruct tokens, ITD layout).
pub struct TokenAr {
    cfg: GptConfig,
    tok_embeddings: Tensor,
    cap_fc1: Tensor,
    cap_fc2: Tensor,
    uncond_embedding: Tensor,
    layers: Vec<Block>,
    norm: Norm,
    output: Weight,
    index_embedding: Option<IndexEmbedding>,
    cell_embedding: Option<CellEmbedding>,
    instruct: Option<InstructTokens>,
    img_uncond: Option<Tensor>,
    alignment: Option<(Tensor, Tensor)>,
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
        let cap = vb.pp("cls_embedding");
        let buf_init = Init::Randn { mean: 0.0, stdev: 1.0 / (cfg.caption_dim as f64).sqrt() };
        let layers = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let img_uncond = if cfg.img_uncond {
            let init = Init::Randn { mean: 0.0, stdev: 1.0 / (d as f64).sqrt() };
            Some(vb.get_with_hints((cfg.cond_slots() * cfg.image_tokens(), d), "img_uncond_embedding", init)?)
        } else {
            None
        };
        let alignment = match cfg.align_dim {
            Some(a) => {
                let al = vb.pp("alignment");
                Some((al.get_with_hints((a, d, 2, 2), "weight", STD)?, al.get_with_hints(a, "bias", Init::Const(0.0))?))
            }
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            tok_embeddings: vb.pp("tok_embeddings").get_with_hints((cfg.vocab_size, d), "weight", STD)?,
            cap_fc1: cap.pp("cap_proj").pp("fc1").get_with_hints((d, cfg.caption_dim), "weight", STD)?,
            cap_fc2: cap.pp("cap_proj").pp("fc2").get_with_hints((d, d), "weight", STD)?,
            uncond_embedding: cap.get_with_hints((cfg.caption_len, cfg.caption_dim), "uncond_embedding", buf_init)?,
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
        let (b, n, hw) = cond.refs.dims3()?;
        let want_hw = self.cfg.image_tokens();
        if hw != want_hw && n > 0 {
            return Err(Error::invalid("condition", format!("reference codes have {hw} tokens, the model's grid {:?} needs {want_hw}", self.cfg.grid)));
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

    /// Embeddings of the prefix (conditions, text, instruct): (B, prefix_len, dim).
    fn embed_prefix(&self, cond: &Condition, layout: &Layout) -> Result<Tensor> {
        let b = cond.batch()?;
        let hw = self.cfg.image_tokens();
        let d = self.cfg.dim;
        let mut parts: Vec<Tensor> = Vec::new();
        // Condition images in layout order, with their img_uncond rows and index ids.
        let mut codes = Vec::new();
        let mut null_rows: Vec<u32> = Vec::new();
        let mut ids = Vec::new();
        for seg in layout.segments().iter().filter(|s| s.kind.is_image_condition()) {
            let (c, slot) = match seg.kind {
                SegmentKind::Ref(i) => (cond.refs.narrow(1, i, 1)?.squeeze(1)?, i),
                _ => (cond.background.clone(), self.cfg.cond_slots() - 1),
            };
            codes.push(c);
            null_rows.extend((slot * hw..(slot + 1) * hw).map(|r| r as u32));
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
                x = Self::blend_rows(&x, &null.detach().index_select(&rows, 0)?, &cond.drop_image)?;
            }
            parts.push(x);
        }
        // Text: padded rows zeroed (LlamaGen), then the caption projection.
        let mut text = Self::blend_rows(&cond.text, &self.uncond_embedding.detach(), &cond.drop_text)?;
        if let Some(m) = &cond.text_mask {
            text = text.broadcast_mul(&m.to_dtype(text.dtype())?.unsqueeze(2)?)?;
        }
        let t = linear(&linear(&text, &self.cap_fc1)?.gelu()?, &self.cap_fc2)?;
        parts.push(t);
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
        for b in &mut self.layers {
            for w in [&mut b.wqkv, &mut b.wo, &mut b.w1, &mut b.w2, &mut b.w3] {
                *w = w.convert(dtype)?;
            }
        }
        self.output = self.output.convert(dtype)?;
        Ok(())
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
        let blocks: usize = self.layers.iter().map(|b| [&b.wqkv, &b.wo, &b.w1, &b.w2, &b.w3].iter().map(|w| w.bytes()).sum::<usize>()).sum();
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
        let (w, bias) = self.alignment.as_ref().ok_or_else(|| Error::invalid("alignment", "this configuration has no alignment head"))?;
        let (b, _, d) = target_features.dims3()?;
        let (gh, gw) = self.cfg.grid;
        let x = target_features.transpose(1, 2)?.reshape((b, d, gh, gw))?.contiguous()?;
        let y = x.conv2d(w, 0, 2, 1, 1)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
        Ok(y.flatten_from(2)?.transpose(1, 2)?)
    }

    /// The text features of a dropped caption, (b, caption_len, caption_dim).
    pub fn uncond_text(&self, b: usize) -> Result<Tensor> {
        let (l, c) = self.uncond_embedding.dims2()?;
        Ok(self.uncond_embedding.unsqueeze(0)?.broadcast_as((b, l, c))?.contiguous()?)
    }

    /// Prefill the conditions (with CFG: rows `[cond; uncond]`, the uncond rows using the
    /// uncond text embedding) and return the decoding session and the logits (rows, V) of the
    /// first generated token.
    pub fn start(&self, cond: &Condition, cfg_guidance: bool) -> Result<(Session<'_>, Tensor)> {
        self.start_with(cond, cfg_guidance, true)
    }

    /// [`TokenAr::start`] for `samples` samples of one condition (`cond` of batch 1): the
    /// prefix is run once and its keys and values copied to every sample's rows
    /// ([`Session::repeat_samples`]).
    pub fn start_samples(&self, cond: &Condition, cfg_guidance: bool, samples: usize) -> Result<(Session<'_>, Tensor)> {
        let b = cond.batch()?;
        if b != 1 {
            return Err(crate::error::Error::invalid("condition", format!("batch of {b}; samples of one condition need a batch of 1")));
        }
        let (mut session, first) = self.start(cond, cfg_guidance)?;
        let first = session.repeat_samples(samples, &first)?;
        Ok((session, first))
    }

    /// [`TokenAr::start`]; `fused_attention: false` keeps the composed attention on the CPU
    /// too (the path other devices take), so that tests can compare the two.
    pub(crate) fn start_with(&self, cond: &Condition, cfg_guidance: bool, fused_attention: bool) -> Result<(Session<'_>, Tensor)> {
        let layout = self.layout_for(cond)?;
        let cond = if cfg_guidance { cond.with_uncond_rows()? } else { cond.clone() };
        let rows = cond.batch()?;
        let (cos, sin) = rope::tables(layout.rope_cells(), self.cfg.head_dim(), self.cfg.rope_base, &self.device)?;
        let keypad = self.key_padding(&cond, &layout, layout.total_len())?;
        let x = self.embed_prefix(&cond, &layout)?;
        let mut session = Session::new(self, layout, rows, (cos, sin, keypad), fused_attention)?;
        let h = session.prefill(x)?;
        let p = h.dim(1)?;
        let logits = session.head(&h.narrow(1, p - 1, 1)?)?.squeeze(1)?;
        Ok((session, logits))
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

#[cfg(test)]
#[path = "dtype_tests.rs"]
mod dtype_tests;

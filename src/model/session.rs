//! The decoding session: [`TokenAr::start`] prefills the condition part of a sequence into a
//! KV cache per layer ([`LayerCache`]) and hands a [`Session`] that the sampler drives through
//! [`TokenModel`], feeding generated tokens at the positions the layout gives them.

use super::condition::Condition;
use super::gpt::{AttnInputs, Ctx, TokenAr};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::nn::{rope, CachedStep, LayerCache, WeightDtype};
use crate::sample::TokenModel;
use candle_core::{DType, Tensor};

impl TokenAr {
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
            return Err(Error::invalid("condition", format!("batch of {b}; samples of one condition need a batch of 1")));
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
        let cfg = self.config();
        let (cos, sin) = rope::tables(layout.rope_cells(), cfg.head_dim(), cfg.rope_base, self.device())?;
        let keypad = self.key_padding(&cond, &layout, layout.total_len())?;
        let x = self.embed_prefix(&cond, &layout)?;
        let mut session = Session::new(self, layout, rows, (cos, sin, keypad), fused_attention)?;
        let h = session.prefill(x)?;
        let p = h.dim(1)?;
        let logits = session.head(&h.narrow(1, p - 1, 1)?)?.squeeze(1)?;
        Ok((session, logits))
    }
}

/// A prefilled model: feeds generated tokens one step (or several) at a time.
pub struct Session<'m> {
    model: &'m TokenAr,
    layout: Layout,
    rows: usize,
    caches: Vec<LayerCache>,
    cos: Tensor,
    sin: Tensor,
    keypad: Option<Tensor>,
    fed: usize,
    /// On the CPU in f32: the RoPE tables and the key mask as values, for the fused cached
    /// attention ([`CachedStep`]).
    host: Option<HostTables>,
}

/// [`Session`]'s tables as plain values: cos and sin (positions x head_dim / 2), key mask
/// (rows x positions).
struct HostTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    keypad: Option<Vec<f32>>,
}

impl<'m> Session<'m> {
    /// A session over `layout` with the RoPE tables and key mask of its positions; `fused`:
    /// the fused CPU attention where it applies (CPU, f32), else the composed one. The fused
    /// attention's cache is f16 when the linear weights are reduced (any `--dtype` but f32).
    pub(crate) fn new(model: &'m TokenAr, layout: Layout, rows: usize, (cos, sin, keypad): (Tensor, Tensor, Option<Tensor>), fused: bool) -> Result<Self> {
        let (n_layer, n_head, hd) = model.dims();
        let cap = layout.total_len();
        let fused = fused && model.device().is_cpu() && model.dtype() == DType::F32;
        // Reduced weights: the fused attention's cache in f16 as well (half its memory).
        let cache_dtype = if model.weight_dtype() == WeightDtype::F32 { DType::F32 } else { DType::F16 };
        let caches = (0..n_layer)
            .map(|_| if fused { LayerCache::new_fused(rows, n_head, cap, hd, model.device(), cache_dtype) } else { LayerCache::new(rows, n_head, cap, hd, model.device(), false) })
            .collect::<Result<Vec<_>>>()?;
        let host = if fused {
            let values = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            Some(HostTables { cos: values(&cos)?, sin: values(&sin)?, keypad: keypad.as_ref().map(values).transpose()? })
        } else {
            None
        };
        Ok(Self { model, layout, rows, caches, cos, sin, keypad, fed: 0, host })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Bytes the KV caches of all layers take (allocated for the whole layout).
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(LayerCache::bytes).sum()
    }

    /// Turn a session prefilled for one sample (rows `[cond]`, or `[cond; uncond]` with
    /// guidance) into `samples` samples of that condition (rows `[cond x samples]`, or
    /// `[cond x samples; uncond x samples]`) by copying the cached keys and values: the
    /// prefix is run once instead of once per sample. `first` are the logits [`TokenAr::start`]
    /// returned, `(rows, vocab)`; returns them for the new rows.
    pub fn repeat_samples(&mut self, samples: usize, first: &Tensor) -> Result<Tensor> {
        if samples == 0 {
            return Err(Error::invalid("samples", "0 (at least one is needed)"));
        }
        if self.fed != 0 {
            return Err(Error::invalid("KV cache", format!("{} tokens already fed; samples are repeated right after the prefill", self.fed)));
        }
        if !(1..=2).contains(&self.rows) || first.dim(0)? != self.rows {
            return Err(Error::invalid(
                "KV cache",
                format!("a session of {} rows with first logits {:?} is not one sample (1 row, or 2 with guidance)", self.rows, first.dims()),
            ));
        }
        if samples == 1 {
            return Ok(first.clone());
        }
        let index: Vec<u32> = (0..self.rows as u32).flat_map(|g| std::iter::repeat_n(g, samples)).collect();
        let idx = Tensor::new(index.as_slice(), first.device())?;
        for c in &mut self.caches {
            c.select_rows(&idx)?;
        }
        self.keypad = self.keypad.as_ref().map(|k| k.index_select(&idx, 0)).transpose()?;
        if let Some(host) = &mut self.host {
            if let Some(k) = &host.keypad {
                let stride = k.len() / self.rows;
                host.keypad = Some(index.iter().flat_map(|&g| k[g as usize * stride..(g as usize + 1) * stride].iter().copied()).collect());
            }
        }
        self.rows *= samples;
        Ok(first.index_select(&idx, 0)?)
    }

    /// Run `x` (rows, T, dim) at positions `start .. start + T`, appending to the caches;
    /// returns the hidden states before the final norm, of the last `keep` positions (all
    /// with `None`).
    fn step(&mut self, x: Tensor, start: usize, keep: Option<usize>) -> Result<Tensor> {
        let t = x.dim(1)?;
        let len = start + t;
        let mut ctx = Ctx { differentiable: false, rng: None };
        if let Some(host) = &self.host {
            let half = self.cos.dim(1)?;
            let range = start * half..len * half;
            let (Some(cos), Some(sin)) = (host.cos.get(range.clone()), host.sin.get(range)) else {
                return Err(Error::invalid("KV cache", format!("positions {start}..{len} beyond the RoPE tables of {} positions", host.cos.len() / half.max(1))));
            };
            let cached = CachedStep {
                start,
                cos,
                sin,
                keypad: host.keypad.as_deref().map(|k| (k, self.layout.total_len())),
            };
            let (cos, sin) = (self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?);
            let att = AttnInputs { cos: &cos, sin: &sin, mask: None, cached: Some(cached) };
            return self.model.run_blocks(x, &att, Some(&mut self.caches), &mut ctx, true, keep);
        }
        let causal = if t > 1 { Some(self.model.causal(t, start)?) } else { None };
        let kp = self.keypad.as_ref().map(|k| k.narrow(3, 0, len)).transpose()?;
        let mask = match (causal, kp) {
            (Some(c), Some(k)) => Some(c.broadcast_add(&k)?),
            (c, k) => c.or(k),
        };
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let att = AttnInputs { cos: &cos, sin: &sin, mask: mask.as_ref(), cached: None };
        self.model.run_blocks(x, &att, Some(&mut self.caches), &mut ctx, true, keep)
    }

    pub(crate) fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.model.head(h)
    }

    /// Run the prefix; returns the hidden state of its last position (rows, 1, dim).
    pub(crate) fn prefill(&mut self, x: Tensor) -> Result<Tensor> {
        self.step(x, 0, Some(1))
    }

    /// Feed `tokens` (rows, T); the hidden states of the last `keep` of them.
    fn feed_keeping(&mut self, tokens: &Tensor, keep: Option<usize>) -> Result<Tensor> {
        let (r, t) = tokens.dims2()?;
        if r != self.rows {
            return Err(Error::invalid("tokens", format!("{r} rows fed to a session of {} rows", self.rows)));
        }
        if t == 0 {
            return Err(Error::invalid("tokens", "no tokens fed"));
        }
        if self.fed + t > self.layout.generated_len() {
            return Err(Error::invalid(
                "tokens",
                format!("{} + {t} tokens exceed the {} generated positions of the layout", self.fed, self.layout.generated_len()),
            ));
        }
        let start = self.layout.prefix_len() + self.fed;
        let x = self.model.embed_generated(tokens, &self.layout, start)?;
        let h = self.step(x, start, keep)?;
        self.fed += t;
        Ok(h)
    }
}

impl TokenModel for Session<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn generated_len(&self) -> usize {
        self.fed
    }

    fn feed(&mut self, tokens: &Tensor) -> Result<Tensor> {
        let h = self.feed_keeping(tokens, None)?;
        self.head(&h)
    }

    fn feed_last(&mut self, tokens: &Tensor) -> Result<Tensor> {
        let h = self.feed_keeping(tokens, Some(1))?;
        self.head(&h)
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.fed {
            return Err(Error::invalid("truncate", format!("length {len} beyond the {} generated tokens", self.fed)));
        }
        let keep = self.layout.prefix_len() + len;
        for c in &mut self.caches {
            c.truncate(keep);
        }
        self.fed = len;
        Ok(())
    }
}

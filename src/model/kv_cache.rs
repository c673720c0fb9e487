//! KV cache and the decoding session the sampler drives ([`TokenModel`]).

use super::gpt::{AttnInputs, Ctx, Packed, TokenAr};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::sample::TokenModel;
use candle_core::{DType, Tensor};

/// One layer's keys and values, preallocated (rows, H, capacity, head_dim); `len` are valid.
pub struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    pub fn new(rows: usize, n_head: usize, capacity: usize, head_dim: usize, device: &candle_core::Device) -> Result<Self> {
        let z = || Tensor::zeros((rows, n_head, capacity, head_dim), DType::F32, device);
        Ok(Self { k: z()?, v: z()?, len: 0 })
    }

    /// Append (rows, H, T, hd) keys and values; return all valid keys and values.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let cap = self.k.dim(2)?;
        if self.len + t > cap {
            return Err(Error::invalid("KV cache", format!("{} + {t} positions exceed the capacity {cap}", self.len)));
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
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
    packed: Packed,
}

impl<'m> Session<'m> {
    pub(crate) fn new(model: &'m TokenAr, layout: Layout, rows: usize, cos: Tensor, sin: Tensor, keypad: Option<Tensor>) -> Result<Self> {
        let (n_layer, n_head, hd) = model.dims();
        let cap = layout.total_len();
        let caches = (0..n_layer)
            .map(|_| LayerCache::new(rows, n_head, cap, hd, model.device()))
            .collect::<Result<Vec<_>>>()?;
        let packed = model.pack()?;
        Ok(Self { model, layout, rows, caches, cos, sin, keypad, fed: 0, packed })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Run `x` (rows, T, dim) at positions `start .. start + T`, appending to the caches;
    /// returns the hidden states before the final norm.
    fn step(&mut self, x: Tensor, start: usize) -> Result<Tensor> {
        let t = x.dim(1)?;
        let len = start + t;
        let causal = if t > 1 { Some(self.model.causal(t, start)?) } else { None };
        let kp = self.keypad.as_ref().map(|k| k.narrow(3, 0, len)).transpose()?;
        let mask = match (causal, kp) {
            (Some(c), Some(k)) => Some(c.broadcast_add(&k)?),
            (c, k) => c.or(k),
        };
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let att = AttnInputs { cos: &cos, sin: &sin, mask: mask.as_ref() };
        let mut ctx = Ctx { differentiable: false, rng: None };
        self.model.run_blocks(x, &att, Some(&mut self.caches), &mut ctx, Some(&self.packed))
    }

    pub(crate) fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.model.head(h)
    }

    pub(crate) fn prefill(&mut self, x: Tensor) -> Result<Tensor> {
        self.step(x, 0)
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
        let (r, t) = tokens.dims2()?;
        if r != self.rows {
            return Err(Error::invalid("tokens", format!("{r} rows fed to a session of {} rows", self.rows)));
        }
        if self.fed + t > self.layout.generated_len() {
            return Err(Error::invalid(
                "tokens",
                format!("{} + {t} tokens exceed the {} generated positions of the layout", self.fed, self.layout.generated_len()),
            ));
        }
        let start = self.layout.prefix_len() + self.fed;
        let x = self.model.embed_generated(tokens, &self.layout, start)?;
        let h = self.step(x, start)?;
        self.fed += t;
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

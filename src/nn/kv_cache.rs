//! One layer's KV cache for the decoding session: keys and values of the positions seen so
//! far, for the composed attention or the fused CPU attention ([`cached_attention`]).

use super::kv_attention::{cached_attention, CachedStep};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// One layer's keys and values, preallocated; the first `len` positions are valid. Layout
/// (rows, H, capacity, head_dim) for the composed attention ([`LayerCache::append`]), or
/// (rows, H, head_dim, capacity) for the fused CPU attention ([`LayerCache::attend`]).
pub struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
    transposed: bool,
}

impl LayerCache {
    /// A cache for the composed attention; `transposed`: for the fused CPU attention.
    pub fn new(rows: usize, n_head: usize, capacity: usize, head_dim: usize, device: &Device, transposed: bool) -> Result<Self> {
        let shape = if transposed { (rows, n_head, head_dim, capacity) } else { (rows, n_head, capacity, head_dim) };
        let z = || Tensor::zeros(shape, DType::F32, device);
        Ok(Self { k: z()?, v: z()?, len: 0, transposed })
    }

    /// A cache for the fused CPU attention holding its keys and values as `dtype`: f32, or f16
    /// (half the memory; values rounded to f16 as they are appended).
    pub fn new_fused(rows: usize, n_head: usize, capacity: usize, head_dim: usize, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(Error::invalid("KV cache", format!("{dtype:?} (the fused CPU attention keeps f32 or f16)")));
        }
        let z = || Tensor::zeros((rows, n_head, head_dim, capacity), dtype, device);
        Ok(Self { k: z()?, v: z()?, len: 0, transposed: true })
    }

    /// The dtype the keys and values are stored in.
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }

    /// Bytes the keys and values take (the whole capacity).
    pub fn bytes(&self) -> usize {
        2 * self.k.elem_count() * self.k.dtype().size_in_bytes()
    }

    /// Append (rows, H, T, hd) keys and values; return all valid keys and values.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.transposed {
            return Err(Error::invalid("KV cache", "a cache laid out for the fused CPU attention was given to the composed one"));
        }
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

    /// The fused CPU attention ([`crate::nn::cached_attention`]): appends the step's keys and
    /// values from `qkv` and attends from its last `queries` positions. `None` for a cache
    /// laid out for the composed attention (nothing appended).
    pub fn attend(&mut self, qkv: &Tensor, heads: usize, scale: f64, step: &CachedStep, queries: usize) -> Result<Option<Tensor>> {
        if !self.transposed {
            return Ok(None);
        }
        if step.start != self.len {
            return Err(Error::invalid("KV cache", format!("a step at position {} after {} cached positions", step.start, self.len)));
        }
        let y = cached_attention(qkv, &self.k, &self.v, heads, scale, step, queries)?;
        if y.is_none() {
            return Err(Error::invalid("KV cache", "the fused CPU attention does not apply to these tensors (not f32 / f16 on the CPU)"));
        }
        self.len += qkv.dim(1)?;
        Ok(y)
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

    /// Keep the rows `index` (u32) of the cache, in that order (a row may repeat).
    pub fn select_rows(&mut self, index: &Tensor) -> Result<()> {
        self.k = self.k.index_select(index, 0)?;
        self.v = self.v.index_select(index, 0)?;
        Ok(())
    }
}

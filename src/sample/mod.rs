//! Sampling: CFG, temperature / top-k / top-p, seeded draws, and the ITD decoding strategies.
//!
//! The sampler drives any model through [`TokenModel`]: the model has already prefilled its
//! condition; the sampler feeds tokens and reads logits.
//!
//! - [`SampleOptions`]: guidance scale, temperature, top-k, top-p, seed; its
//!   [`SampleOptions::probs`] is the one place a position's distribution is computed.
//! - [`generate`]: decodes a batch under a [`DecodePlan`] (target length, ITD draft and
//!   [`ItdMode`]) and returns [`Generated`] tokens with [`DecodeStats`].

use crate::error::Result;
use candle_core::Tensor;

/// A model session the sampler drives. The condition (references, background, text, instruct
/// tokens) has been prefilled; what remains is the generated part of the sequence.
///
/// With classifier-free guidance the session holds `2 * n` rows laid out `[cond; uncond]`
/// (row `i` and row `n + i` belong to sample `i`); the sampler feeds both the same token.
pub trait TokenModel {
    /// Rows in the model batch (`2 * samples` with CFG, `samples` without).
    fn rows(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Generated tokens fed so far (0 right after prefill).
    fn generated_len(&self) -> usize;
    /// Append `tokens` (rows, T) u32 to every row and return logits (rows, T, vocab) f32:
    /// entry `[:, t]` predicts the token that follows `tokens[:, t]`.
    fn feed(&mut self, tokens: &Tensor) -> Result<Tensor>;
    /// [`TokenModel::feed`] where only the last position's logits are needed: (rows, 1,
    /// vocab). A model may skip work for the others.
    fn feed_last(&mut self, tokens: &Tensor) -> Result<Tensor> {
        let logits = self.feed(tokens)?;
        let t = logits.dim(1)?;
        if t == 0 {
            return Err(crate::error::Error::invalid("tokens", "no tokens fed"));
        }
        Ok(logits.narrow(1, t - 1, 1)?)
    }
    /// Forget generated tokens beyond the first `len` (KV-cache rollback).
    fn truncate(&mut self, len: usize) -> Result<()>;
}

mod decode;
mod logits;
#[cfg(test)]
mod tests;

pub use decode::{generate, DecodePlan, DecodeStats, Generated, ItdMode};
pub use logits::{accept, cfg_combine, draw, residual, SampleOptions};
pub(crate) use logits::guided;

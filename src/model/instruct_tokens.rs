//! Instruct tokens: `n` learned vectors placed after the text. Checkpoint key
//! `instruct_token_embeddings.weight`, shape (1, n * dim) as in the reference code.

use crate::error::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

#[derive(Clone, Debug)]
pub struct InstructTokens {
    weight: Tensor,
    n: usize,
    dim: usize,
}

impl InstructTokens {
    pub fn new(n: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        Ok(Self { weight: vb.get_with_hints((1, n * dim), "weight", init)?, n, dim })
    }

    /// The tokens for a batch: (b, n, dim).
    pub fn forward(&self, b: usize) -> Result<Tensor> {
        Ok(self.weight.reshape((1, self.n, self.dim))?.broadcast_as((b, self.n, self.dim))?)
    }
}

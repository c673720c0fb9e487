//! Token Index Embedding: one learned vector per condition slot (reference 0..max_refs-1 and the
//! background), added to the condition-image token embeddings. Which id each position gets is
//! the [`Layout`](crate::layout::Layout)'s decision. Checkpoint key `ref_index_embeddings.weight`.

use crate::error::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

#[derive(Clone, Debug)]
pub struct IndexEmbedding {
    weight: Tensor,
}

impl IndexEmbedding {
    /// `slots` rows (`max_refs + 1`), each `dim` wide.
    pub fn new(slots: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        Ok(Self { weight: vb.get_with_hints((slots, dim), "weight", init)? })
    }

    /// Add the embedding of `ids[p]` to `x[:, p]` where the id is set. `x`: (B, P, dim).
    pub fn add(&self, x: &Tensor, ids: &[Option<usize>]) -> Result<Tensor> {
        let (_, p, _) = x.dims3()?;
        if ids.iter().all(|i| i.is_none()) {
            return Ok(x.clone());
        }
        // Positions without an id get a zero vector (a zero row appended to the table).
        let slots = self.weight.dim(0)?;
        let zero = self.weight.narrow(0, 0, 1)?.zeros_like()?;
        let table = Tensor::cat(&[&self.weight, &zero], 0)?;
        let idx: Vec<u32> = ids.iter().map(|i| i.unwrap_or(slots) as u32).collect();
        if idx.len() != p {
            return Err(crate::Error::invalid("index ids", format!("{} ids for {p} positions", idx.len())));
        }
        let idx = Tensor::from_vec(idx, p, x.device())?;
        let e = table.index_select(&idx, 0)?;
        Ok(x.broadcast_add(&e)?)
    }
}

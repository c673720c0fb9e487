//! Cell embedding: a learned vector per grid row plus one per grid column, added to every image
//! token (condition images, ITD copies, target) at its cell inside its own image. An addition of
//! this project (off in the reference presets): RoPE tells attention *how far apart* two tokens
//! are, but no token carries *where* it is, so a feature such as "the other masked region lies
//! to my left" cannot be read from attention values; this embedding makes each token's cell
//! part of its value. Which cell each position gets is the
//! [`Layout`](crate::layout::Layout)'s decision. Checkpoint key `cell_embeddings.weight`,
//! shape (rows + cols, dim).

use crate::error::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

#[derive(Clone, Debug)]
pub struct CellEmbedding {
    weight: Tensor,
    grid: (usize, usize),
}

impl CellEmbedding {
    pub fn new(grid: (usize, usize), dim: usize, vb: VarBuilder) -> Result<Self> {
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        Ok(Self { weight: vb.get_with_hints((grid.0 + grid.1, dim), "weight", init)?, grid })
    }

    /// Add row `r`'s and column `c`'s vectors to `x[:, p]` for `cells[p] = Some((r, c))`.
    /// `x`: (B, P, dim).
    pub fn add(&self, x: &Tensor, cells: &[Option<(usize, usize)>]) -> Result<Tensor> {
        let (_, p, _) = x.dims3()?;
        if cells.len() != p {
            return Err(Error::invalid("cell ids", format!("{} cells for {p} positions", cells.len())));
        }
        if cells.iter().all(|c| c.is_none()) {
            return Ok(x.clone());
        }
        let (h, w) = self.grid;
        if let Some((r, c)) = cells.iter().flatten().find(|(r, c)| *r >= h || *c >= w) {
            return Err(Error::invalid("cell ids", format!("cell ({r}, {c}) outside the {h}x{w} grid")));
        }
        // Positions without a cell get zero vectors (a zero row appended to the table).
        let zero = h + w;
        let table = Tensor::cat(&[&self.weight, &self.weight.narrow(0, 0, 1)?.zeros_like()?], 0)?;
        let rows: Vec<u32> = cells.iter().map(|c| c.map_or(zero, |(r, _)| r) as u32).collect();
        let cols: Vec<u32> = cells.iter().map(|c| c.map_or(zero, |(_, c)| h + c) as u32).collect();
        let dev = x.device();
        let e = (table.index_select(&Tensor::from_vec(rows, p, dev)?, 0)? + table.index_select(&Tensor::from_vec(cols, p, dev)?, 0)?)?;
        Ok(x.broadcast_add(&e)?)
    }
}

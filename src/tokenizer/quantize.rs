//! The L2-normalised codebook quantiser (LlamaGen `VectorQuantizer` with `codebook_l2_norm`).
//!
//! Both the latent vectors and the codes are projected onto the unit sphere; the code of a
//! vector is the nearest normalised code in squared L2 distance. Training uses the
//! straight-through estimator with the codebook loss `|sg(z) - e|^2` and the commitment loss
//! `beta * |z - sg(e)|^2`.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

/// The normalisation floor of `F.normalize` (`x / max(|x|, eps)`).
const L2_EPS: f64 = 1e-12;

/// `x / max(|x|, 1e-12)` along the last dimension (differentiable).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(L2_EPS)?;
    Ok(x.broadcast_div(&n)?)
}

pub struct Quantizer {
    /// `quantize.embedding.weight`, (codebook_size, codebook_dim), not normalised in storage.
    embedding: Tensor,
    beta: f64,
}

/// Output of [`Quantizer::forward_train`].
pub struct QuantOut {
    /// Straight-through quantised latent, (B, dim, h, w): values of the codes, gradient of z.
    pub z_q: Tensor,
    /// Codes, (B, h, w) u32.
    pub codes: Tensor,
    /// The normalised latent vectors, (B*h*w, dim), detached (used to restart dead codes).
    pub z_flat: Tensor,
    /// `mean |sg(z) - e|^2`: moves the codes.
    pub codebook_loss: Tensor,
    /// `beta * mean |z - sg(e)|^2`: keeps the encoder near its codes.
    pub commit_loss: Tensor,
}

impl Quantizer {
    pub fn new(codebook_size: usize, codebook_dim: usize, beta: f64, vb: VarBuilder) -> Result<Self> {
        // LlamaGen initialises U(-1/n, 1/n) then normalises; a unit Gaussian gives the same
        // distribution of directions.
        let embedding = vb.get_with_hints(
            (codebook_size, codebook_dim),
            "embedding.weight",
            candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 },
        )?;
        Ok(Self { embedding, beta })
    }

    pub fn codebook_size(&self) -> usize {
        self.embedding.dim(0).unwrap_or(0)
    }

    /// The normalised codebook, (codebook_size, dim).
    pub fn codebook(&self) -> Result<Tensor> {
        l2_normalize(&self.embedding)
    }

    /// Indices of the nearest normalised codes for rows of already-normalised `z` (N, dim).
    pub fn nearest(&self, z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
        // |z|^2 + |e|^2 - 2 z.e, as LlamaGen; the argmin is what matters.
        let z2 = z.sqr()?.sum_keepdim(1)?; // (N, 1)
        let e2 = codebook.sqr()?.sum(1)?.unsqueeze(0)?; // (1, K)
        let d = z2.broadcast_add(&e2)?.broadcast_sub(&(z.matmul(&codebook.t()?)? * 2.0)?)?;
        Ok(d.argmin(1)?)
    }

    /// (B, dim, h, w) -> (B*h*w, dim) normalised, plus (b, h, w).
    fn flatten(&self, z: &Tensor) -> Result<(Tensor, (usize, usize, usize))> {
        let (b, c, h, w) = z.dims4()?;
        let dim = self.embedding.dim(1)?;
        if c != dim {
            return Err(Error::invalid("latent", format!("has {c} channels, the codebook has dimension {dim}")));
        }
        let flat = z.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
        Ok((l2_normalize(&flat)?, (b, h, w)))
    }

    /// Codes of a latent (B, dim, h, w) -> (B, h, w) u32; no gradient.
    pub fn encode(&self, z: &Tensor) -> Result<Tensor> {
        let (flat, (b, h, w)) = self.flatten(&z.detach())?;
        let codebook = self.codebook()?.detach();
        Ok(self.nearest(&flat, &codebook)?.reshape((b, h, w))?)
    }

    /// Code values for codes (B, h, w) u32 -> (B, dim, h, w).
    pub fn lookup(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, h, w) = codes.dims3()?;
        let k = self.codebook_size() as u32;
        let max = codes.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max >= k {
            return Err(Error::invalid("codes", format!("code {max} is out of range for a codebook of {k}")));
        }
        let e = self.codebook()?.index_select(&codes.flatten_all()?, 0)?;
        Ok(e.reshape((b, h, w, ()))?.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// Quantise with gradients (training).
    pub fn forward_train(&self, z: &Tensor) -> Result<QuantOut> {
        let (flat, (b, h, w)) = self.flatten(z)?;
        let codebook = self.codebook()?;
        let idx = self.nearest(&flat.detach(), &codebook.detach())?;
        let zq = codebook.index_select(&idx, 0)?; // gradient reaches the codebook
        let codebook_loss = (&zq - flat.detach())?.sqr()?.mean_all()?;
        let commit_loss = ((zq.detach() - &flat)?.sqr()?.mean_all()? * self.beta)?;
        // Straight-through: the value of zq, the gradient of flat.
        let st = (&flat + (zq.detach() - &flat)?.detach())?;
        let z_q = st.reshape((b, h, w, ()))?.permute((0, 3, 1, 2))?.contiguous()?;
        Ok(QuantOut {
            z_q,
            codes: idx.reshape((b, h, w))?,
            z_flat: flat.detach(),
            codebook_loss,
            commit_loss,
        })
    }
}

/// Fraction of the `codebook_size` codes that occur in `codes` (any shape, u32).
pub fn usage(codes: &Tensor, codebook_size: usize) -> Result<f64> {
    let v = codes.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut seen = vec![false; codebook_size];
    for c in v {
        if let Some(s) = seen.get_mut(c as usize) {
            *s = true;
        }
    }
    Ok(seen.iter().filter(|s| **s).count() as f64 / codebook_size.max(1) as f64)
}

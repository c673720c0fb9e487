//! BEN2's multi-view decoder blocks: MCLM (`multifieldcrossatt`) joins the four local views
//! with the global view at the coarsest level, MCRM (`dec_blk1..4`) refines the views at each
//! finer level. Both work on a batch of 5 maps: the four quarters of the image (top-left,
//! top-right, bottom-left, bottom-right) and the whole image at half resolution.

use candle_core::{Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

use super::ops::{adaptive_avg_pool, image_to_patches, nearest, norm, patches_to_image, round_half_even, sine_position, Mha};
use crate::eval::nets::{linear, Conv};
use crate::weights::TensorFile;
use crate::{Error, Result};

/// Heads of every attention in the decoder (BEN_Base builds MCLM and MCRM with 1; the
/// checkpoint's shapes do not tell).
pub const DECODER_HEADS: usize = 1;
/// Pool ratios of MCLM and MCRM, as BEN_Base builds them.
pub const MCLM_POOLS: [usize; 3] = [1, 4, 8];
pub const MCRM_POOLS: [usize; 3] = [2, 4, 8];

/// Feed-forward with residual and norm: `norm2(x + l2(gelu(l1(x))))`.
struct Ffn {
    l1: Linear,
    l2: Linear,
}

impl Ffn {
    fn load(f: &TensorFile, p: &str, a: &str, b: &str, e: usize) -> Result<Self> {
        Ok(Self { l1: linear(f, &format!("{p}{a}."), e, 2 * e)?, l2: linear(f, &format!("{p}{b}."), 2 * e, e)? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.l2.forward(&self.l1.forward(x)?.gelu_erf()?)?)
    }
}

fn check_views(what: &str, x: &Tensor) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = x.dims4()?;
    if n != 5 || h % 2 != 0 || w % 2 != 0 {
        return Err(Error::invalid(what, format!("expects 5 views of even size, got {:?}", x.dims())));
    }
    Ok((c, h, w))
}

/// (N, C, H, W) -> (N, H*W, C).
fn tokens(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(2)?.transpose(1, 2)?)
}

/// Multi-view complementary localisation: the global view attends to the pooled local views
/// (with sine position embeddings), then each local view attends to its quarter of the
/// refreshed global view.
pub struct Mclm {
    attention: Vec<Mha>,
    ffn_g: Ffn,
    ffn_l: Ffn,
    norm1: LayerNorm,
    norm2: LayerNorm,
    e: usize,
}

impl Mclm {
    pub fn load(f: &TensorFile, p: &str, e: usize) -> Result<Self> {
        if e % 2 != 0 {
            return Err(Error::invalid("BEN2 decoder width", format!("{e} is odd (the position embedding splits it in two)")));
        }
        Ok(Self {
            attention: (0..5).map(|i| Mha::load(f, &format!("{p}attention.{i}."), e, DECODER_HEADS)).collect::<Result<_>>()?,
            ffn_g: Ffn::load(f, p, "linear1", "linear2", e)?,
            ffn_l: Ffn::load(f, p, "linear3", "linear4", e)?,
            norm1: norm(f, &format!("{p}norm1."), e)?,
            norm2: norm(f, &format!("{p}norm2."), e)?,
            e,
        })
    }

    /// 5 views (4 local, 1 global) of (C, h, w) -> 5 views.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c, h, w) = check_views("MCLM", x)?;
        let dev = x.device();
        let loc = x.narrow(0, 0, 4)?;
        let g = x.narrow(0, 4, 1)?;
        let joined = patches_to_image(&loc)?; // (1, C, 2h, 2w)
        let mut pools = Vec::new();
        let mut poses = Vec::new();
        for r in MCLM_POOLS {
            let (ph, pw) = (round_half_even(h as f64 / r as f64), round_half_even(w as f64 / r as f64));
            pools.push(tokens(&adaptive_avg_pool(&joined, ph, pw)?)?.squeeze(0)?);
            poses.push(sine_position(ph, pw, self.e / 2, dev)?);
        }
        let pools = Tensor::cat(&pools, 0)?.unsqueeze(0)?; // (1, P, C)
        let pos = Tensor::cat(&poses, 0)?.unsqueeze(0)?;
        let g_pos = sine_position(h, w, self.e / 2, dev)?.unsqueeze(0)?;

        let gt = tokens(&g)?; // (1, hw, C)
        let a = self.attention[0].forward(&(&gt + &g_pos)?, &(&pools + &pos)?, &pools)?;
        let gt = self.norm1.forward(&(gt + a)?)?;
        let gt = self.norm2.forward(&(&gt + self.ffn_g.forward(&gt)?)?)?;

        // the refreshed global view cut in its 2 x 2 quarters, each attended by one local view
        let g_map = gt.transpose(1, 2)?.reshape((1, c, h, w))?;
        let g_quarters = image_to_patches(&g_map)?; // (4, C, h/2, w/2)
        let lt = tokens(&loc)?; // (4, hw, C)
        let outs = (0..4)
            .map(|i| {
                let q = lt.narrow(0, i, 1)?;
                let kv = tokens(&g_quarters.narrow(0, i, 1)?)?;
                self.attention[i + 1].forward(&q, &kv, &kv)
            })
            .collect::<Result<Vec<_>>>()?;
        let lt = self.norm1.forward(&(lt + Tensor::cat(&outs, 0)?)?)?;
        let lt = self.norm2.forward(&(&lt + self.ffn_l.forward(&lt)?)?)?;
        let all = Tensor::cat(&[&lt, &gt], 0)?; // (5, hw, C)
        Ok(all.transpose(1, 2)?.reshape((5, c, h, w))?)
    }
}

/// Multi-view complementary refinement: a saliency map of the global view gates the local
/// views, which attend to pooled quarters of the global view; the refreshed local views are
/// added back into the global view (nearest resize).
pub struct Mcrm {
    attention: Vec<Mha>,
    ffn: Ffn,
    norm1: LayerNorm,
    norm2: LayerNorm,
    sal_conv: Conv,
}

impl Mcrm {
    pub fn load(f: &TensorFile, p: &str, e: usize) -> Result<Self> {
        Ok(Self {
            attention: (0..4).map(|i| Mha::load(f, &format!("{p}attention.{i}."), e, DECODER_HEADS)).collect::<Result<_>>()?,
            ffn: Ffn::load(f, p, "linear3", "linear4", e)?,
            norm1: norm(f, &format!("{p}norm1."), e)?,
            norm2: norm(f, &format!("{p}norm2."), e)?,
            sal_conv: Conv::load(f, &format!("{p}sal_conv."), (e, 1), (1, 1), 1, (0, 0), true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c, h, w) = check_views("MCRM", x)?;
        let loc = x.narrow(0, 0, 4)?;
        let glb = x.narrow(0, 4, 1)?;
        let quarters = image_to_patches(&glb)?; // (4, C, h/2, w/2)
        let sal = candle_nn::ops::sigmoid(&self.sal_conv.forward(&glb)?)?;
        let sal = nearest(&sal, 2 * h, 2 * w)?;
        let loc = loc.broadcast_mul(&image_to_patches(&sal)?)?;
        let mut pools = Vec::new();
        for r in MCRM_POOLS {
            let (ph, pw) = (round_half_even(h as f64 / r as f64), round_half_even(w as f64 / r as f64));
            pools.push(adaptive_avg_pool(&quarters, ph, pw)?.flatten_from(2)?);
        }
        let pools = Tensor::cat(&pools, D::Minus1)?.transpose(1, 2)?; // (4, P, C)
        let lt = tokens(&loc)?; // (4, hw, C)
        let outs = (0..4)
            .map(|i| {
                let kv = pools.narrow(0, i, 1)?;
                self.attention[i].forward(&lt.narrow(0, i, 1)?, &kv, &kv)
            })
            .collect::<Result<Vec<_>>>()?;
        let src = self.norm1.forward(&(lt + Tensor::cat(&outs, 0)?)?)?;
        let src = self.norm2.forward(&(&src + self.ffn.forward(&src)?)?)?;
        let src = src.transpose(1, 2)?.reshape((4, c, h, w))?;
        let glb = (glb + nearest(&patches_to_image(&src)?, h, w)?)?;
        Ok(Tensor::cat(&[&src, &glb], 0)?)
    }
}

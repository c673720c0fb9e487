//! The Swin Transformer backbone of BEN2 (the detection variant, which pads the token grid to
//! whole windows instead of shrinking the window), keys under `backbone.`.
//!
//! Patch embedding: a p x p conv with stride p (the image padded right/bottom to a multiple of
//! p), then LayerNorm. Stage i (width `embed * 2^i`) holds `depths[i]` blocks; block j shifts
//! its windows by `window / 2` when j is odd. A block: LayerNorm, the token grid padded with
//! zeros (after the norm) right and bottom to whole windows, cyclically rolled up-left by the
//! shift, split into window x window windows, multi-head self-attention inside each window
//! with a learned relative position bias (a (2w-1)^2 x heads table) and, for shifted blocks,
//! the mask (-100 between tokens from different regions of the padded grid), the inverse
//! roll, the crop, the residual, then LayerNorm, MLP (fc1, GELU erf, fc2) and the residual.
//! Between stages, patch merging: the 2 x 2 neighbours concatenated as (even row, even col),
//! (odd, even), (even, odd), (odd, odd), LayerNorm(4C) and a bias-free linear 4C -> 2C.
//! Outputs: the patch embedding (normalised) and each stage's output before merging, each
//! through its own LayerNorm `norm{i}`, as (B, C, H, W) maps.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::ops::norm;
use crate::eval::nets::{linear, Conv};
use crate::weights::TensorFile;
use crate::{Error, Result};

/// The backbone's shape, read from the tensors of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct SwinConfig {
    pub patch: usize,
    pub embed: usize,
    pub depths: Vec<usize>,
    pub heads: Vec<usize>,
    pub window: usize,
    /// MLP hidden width of stage i is `mlp_hidden[i]` (4 x width as published).
    pub mlp_hidden: Vec<usize>,
}

impl SwinConfig {
    /// Width of stage i.
    pub fn width(&self, i: usize) -> usize {
        self.embed << i
    }

    /// Read the shape from `f` (keys without the `backbone.` prefix).
    pub fn from_file(f: &TensorFile) -> Result<Self> {
        let bad = |msg: String| Error::bad_file(&f.path, msg);
        let pe = f.tensors.get("patch_embed.proj.weight").ok_or_else(|| bad("no `backbone.patch_embed.proj.weight`: not a BEN2 (Swin) checkpoint".into()))?;
        let (embed, _, patch, pw) = pe.dims4()?;
        if patch != pw || patch == 0 {
            return Err(bad(format!("patch embedding kernel {:?} is not square", pe.dims())));
        }
        let (mut depths, mut heads, mut mlp_hidden, mut window) = (vec![], vec![], vec![], 0);
        while f.contains(&format!("layers.{}.blocks.0.norm1.weight", depths.len())) {
            let i = depths.len();
            let mut d = 0;
            while f.contains(&format!("layers.{i}.blocks.{d}.norm1.weight")) {
                d += 1;
            }
            let table = f.tensors.get(&format!("layers.{i}.blocks.0.attn.relative_position_bias_table")).ok_or_else(|| {
                bad(format!("missing `backbone.layers.{i}.blocks.0.attn.relative_position_bias_table`"))
            })?;
            let (n, h) = table.dims2()?;
            let side = (n as f64).sqrt().round() as usize;
            if side * side != n || side % 2 == 0 {
                return Err(bad(format!("relative position table of stage {i} has {n} rows, not (2w-1)^2")));
            }
            let w = side.div_ceil(2);
            if window != 0 && window != w {
                return Err(bad(format!("stage {i} has window {w}, stage 0 has {window}")));
            }
            window = w;
            let fc1 = f.tensors.get(&format!("layers.{i}.blocks.0.mlp.fc1.weight")).ok_or_else(|| bad(format!("missing `backbone.layers.{i}.blocks.0.mlp.fc1.weight`")))?;
            depths.push(d);
            heads.push(h);
            mlp_hidden.push(fc1.dim(0)?);
        }
        if depths.is_empty() {
            return Err(bad("no `backbone.layers.0.blocks.0`: not a BEN2 (Swin) checkpoint".into()));
        }
        let cfg = Self { patch, embed, depths, heads, window, mlp_hidden };
        for (i, &h) in cfg.heads.iter().enumerate() {
            if h == 0 || cfg.width(i) % h != 0 {
                return Err(bad(format!("stage {i}: {h} heads do not divide width {}", cfg.width(i))));
            }
        }
        Ok(cfg)
    }
}

/// The pair-wise relative position index of a w x w window (N x N, N = w^2), as the reference
/// computes it: (dy + w - 1) * (2w - 1) + (dx + w - 1).
fn relative_index(w: usize) -> Vec<u32> {
    let n = w * w;
    let mut idx = Vec::with_capacity(n * n);
    for a in 0..n {
        for b in 0..n {
            let dy = (a / w) as i64 - (b / w) as i64 + w as i64 - 1;
            let dx = (a % w) as i64 - (b % w) as i64 + w as i64 - 1;
            idx.push((dy * (2 * w as i64 - 1) + dx) as u32);
        }
    }
    idx
}

/// The shifted-window attention mask of a padded hp x wp grid: (nW, N, N) with 0 inside a
/// region and -100 across regions.
fn shift_mask(hp: usize, wp: usize, w: usize, shift: usize, dev: &Device) -> Result<Tensor> {
    let region = |i: usize, len: usize| -> usize {
        if i < len - w {
            0
        } else if i < len - shift {
            1
        } else {
            2
        }
    };
    let n = w * w;
    let (nh, nw) = (hp / w, wp / w);
    let mut out = Vec::with_capacity(nh * nw * n * n);
    for wy in 0..nh {
        for wx in 0..nw {
            let ids: Vec<usize> = (0..n).map(|t| region(wy * w + t / w, hp) * 3 + region(wx * w + t % w, wp)).collect();
            for a in 0..n {
                for b in 0..n {
                    out.push(if ids[a] == ids[b] { 0f32 } else { -100f32 });
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (nh * nw, n, n), dev)?)
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    /// (heads, N, N), gathered from the table once.
    bias: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    shift: usize,
}

impl Block {
    fn load(f: &TensorFile, p: &str, dim: usize, heads: usize, hidden: usize, window: usize, shift: usize) -> Result<Self> {
        let n = window * window;
        let t = (2 * window - 1) * (2 * window - 1);
        let table = f.get(&format!("{p}attn.relative_position_bias_table"), &[t, heads])?.to_dtype(DType::F32)?;
        let idx = Tensor::from_vec(relative_index(window), n * n, table.device())?;
        let bias = table.index_select(&idx, 0)?.reshape((n, n, heads))?.permute((2, 0, 1))?.contiguous()?;
        Ok(Self {
            norm1: norm(f, &format!("{p}norm1."), dim)?,
            qkv: linear(f, &format!("{p}attn.qkv."), dim, 3 * dim)?,
            proj: linear(f, &format!("{p}attn.proj."), dim, dim)?,
            bias,
            norm2: norm(f, &format!("{p}norm2."), dim)?,
            fc1: linear(f, &format!("{p}mlp.fc1."), dim, hidden)?,
            fc2: linear(f, &format!("{p}mlp.fc2."), hidden, dim)?,
            heads,
            shift,
        })
    }

    /// x (B, H*W, C) -> (B, H*W, C); `mask` (nW, N, N) for shifted blocks.
    fn forward(&self, x: &Tensor, h: usize, w: usize, window: usize, mask: &Tensor) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let (hp, wp) = (h.div_ceil(window) * window, w.div_ceil(window) * window);
        let y = self.norm1.forward(x)?.reshape((b, h, w, c))?;
        let mut y = y.pad_with_zeros(1, 0, hp - h)?.pad_with_zeros(2, 0, wp - w)?;
        if self.shift > 0 {
            y = y.roll(-(self.shift as i32), 1)?.roll(-(self.shift as i32), 2)?;
        }
        let (nh, nw, n) = (hp / window, wp / window, window * window);
        let win = y.reshape((b, nh, window, nw, window, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((b * nh * nw, n, c))?;
        let att = self.attention(&win, if self.shift > 0 { Some(mask) } else { None })?;
        let mut y = att.reshape((b, nh, nw, window, window, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((b, hp, wp, c))?;
        if self.shift > 0 {
            y = y.roll(self.shift as i32, 1)?.roll(self.shift as i32, 2)?;
        }
        let y = y.narrow(1, 0, h)?.narrow(2, 0, w)?.reshape((b, l, c))?;
        let x = (x + y)?;
        let m = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        Ok((x + m)?)
    }

    fn attention(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (bw, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self.qkv.forward(x)?.reshape((bw, n, 3, self.heads, hd))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)? * (hd as f64).powf(-0.5))?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mut attn = q.matmul(&k.t()?)?.broadcast_add(&self.bias)?;
        if let Some(m) = mask {
            let nw = m.dim(0)?;
            attn = attn.reshape((bw / nw, nw, self.heads, n, n))?.broadcast_add(&m.unsqueeze(1)?.unsqueeze(0)?)?.reshape((bw, self.heads, n, n))?;
        }
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((bw, n, c))?;
        Ok(self.proj.forward(&y)?)
    }
}

struct Merge {
    norm: LayerNorm,
    reduction: Linear,
}

impl Merge {
    /// (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C).
    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let x = x.reshape((b, h, w, c))?.pad_with_zeros(1, 0, h % 2)?.pad_with_zeros(2, 0, w % 2)?;
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        // (B, h2, a, w2, b, C) -> (B, h2, w2, b, a, C): concatenation order x0, x1, x2, x3
        let x = x.reshape((b, h2, 2, w2, 2, c))?.permute((0, 1, 3, 4, 2, 5))?.reshape((b, h2 * w2, 4 * c))?;
        Ok(self.reduction.forward(&self.norm.forward(&x)?)?)
    }
}

struct Stage {
    blocks: Vec<Block>,
    merge: Option<Merge>,
    out_norm: LayerNorm,
}

pub struct Swin {
    pub cfg: SwinConfig,
    patch_embed: Conv,
    patch_norm: LayerNorm,
    stages: Vec<Stage>,
}

impl Swin {
    /// Load from `f` (keys without the `backbone.` prefix).
    pub fn load(f: &TensorFile) -> Result<Self> {
        let cfg = SwinConfig::from_file(f)?;
        let patch_embed = Conv::load(f, "patch_embed.proj.", (3, cfg.embed), (cfg.patch, cfg.patch), cfg.patch, (0, 0), true)?;
        let patch_norm = norm(f, "patch_embed.norm.", cfg.embed)?;
        let last = cfg.depths.len() - 1;
        let stages = (0..cfg.depths.len())
            .map(|i| {
                let dim = cfg.width(i);
                let blocks = (0..cfg.depths[i])
                    .map(|j| {
                        let shift = if j % 2 == 1 { cfg.window / 2 } else { 0 };
                        Block::load(f, &format!("layers.{i}.blocks.{j}."), dim, cfg.heads[i], cfg.mlp_hidden[i], cfg.window, shift)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let merge = if i < last {
                    Some(Merge {
                        norm: norm(f, &format!("layers.{i}.downsample.norm."), 4 * dim)?,
                        reduction: Linear::new(f.get(&format!("layers.{i}.downsample.reduction.weight"), &[2 * dim, 4 * dim])?.to_dtype(DType::F32)?, None),
                    })
                } else {
                    None
                };
                Ok(Stage { blocks, merge, out_norm: norm(f, &format!("norm{i}."), dim)? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, patch_embed, patch_norm, stages })
    }

    /// Images (B, 3, H, W) -> [patch embedding, stage 0, ..., stage n-1] as (B, C, h, w).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let p = self.cfg.patch;
        let x = x.pad_with_zeros(3, 0, (p - w % p) % p)?.pad_with_zeros(2, 0, (p - h % p) % p)?;
        let e = self.patch_embed.forward(&x)?;
        let (b, c, mut h, mut w) = e.dims4()?;
        let t = self.patch_norm.forward(&e.flatten_from(2)?.transpose(1, 2)?)?;
        let mut outs = vec![t.transpose(1, 2)?.reshape((b, c, h, w))?];
        let mut x = t;
        let win = self.cfg.window;
        let shift = win / 2;
        for (i, stage) in self.stages.iter().enumerate() {
            let (hp, wp) = (h.div_ceil(win) * win, w.div_ceil(win) * win);
            let mask = shift_mask(hp, wp, win, shift, x.device())?;
            for blk in &stage.blocks {
                x = blk.forward(&x, h, w, win, &mask)?;
            }
            let dim = self.cfg.width(i);
            let o = stage.out_norm.forward(&x)?;
            outs.push(o.transpose(1, 2)?.reshape((b, dim, h, w))?);
            if let Some(m) = &stage.merge {
                x = m.forward(&x, h, w)?;
                h = h.div_ceil(2);
                w = w.div_ceil(2);
            }
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_and_mask_follow_the_reference() -> Result<()> {
        // w = 2: N = 4, table 3 x 3; token 0 (0,0) vs token 3 (1,1): dy = -1 + 1 = 0, dx = 0 -> 0
        let idx = relative_index(2);
        assert_eq!(idx[3], 0);
        assert_eq!(idx[0], 4); // same token: (1 * 3 + 1)
        assert_eq!(idx[3 * 4], 8);
        // a 4x4 grid, window 2, shift 1: the last window mixes 4 regions
        let m = shift_mask(4, 4, 2, 1, &Device::Cpu)?;
        assert_eq!(m.dims(), &[4, 4, 4]);
        let first: Vec<f32> = m.get(0)?.flatten_all()?.to_vec1()?;
        assert!(first.iter().all(|&v| v == 0.0));
        let last: Vec<Vec<f32>> = m.get(3)?.to_vec2()?;
        assert_eq!(last[0], vec![0.0, -100.0, -100.0, -100.0]);
        Ok(())
    }
}

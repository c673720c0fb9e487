//! DINOv2 patch features as the EditAR/TokenAR distillation target: a Hugging Face
//! `Dinov2Model` (`facebook/dinov2-base` in the reference recipe) read from its safetensors
//! key names (`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`; a `dinov2.` prefix is
//! accepted), with the preprocessing of its `BitImageProcessor`.
//!
//! The width, depth and patch size are read from the tensors; the head count and LayerNorm
//! eps from a `config.json` beside the weights (the Hugging Face layout) when there is one,
//! else 64-wide heads (every published DINOv2) and eps 1e-6. The output is the final
//! LayerNorm's sequence without the CLS token (`last_hidden_state[:, 1:]`): (B, 256, width)
//! at the 224 px crop with patch 14.
//!
//! Preprocessing, as the reference (`(x + 1) / 2` handed to the slow `BitImageProcessor` of
//! transformers 4.54 with `do_rescale=False`): the image goes through 8-bit PIL: scaled by 255
//! and truncated to u8 (here with a 1e-4 margin, so an image read from an 8-bit file comes
//! back exactly), resized so the shorter side is 256 with PIL's bicubic filter and rounded to
//! u8, divided by 255, centre-cropped to 224 (offset floored) and normalised with the ImageNet
//! mean and std. The position embeddings (trained at 518 px, a 37x37 grid) are resampled to
//! the input grid once at load, with PyTorch's bicubic interpolation (`align_corners=False`,
//! A = -0.75, no antialiasing) as `Dinov2Embeddings.interpolate_pos_encoding` does.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::preprocess::{check_images, resize, Resample, IMAGENET_MEAN, IMAGENET_STD};
use super::{layer_norm, linear, open_weights, Conv};
use crate::{Error, Result};

const NEEDS: &str = "distillation features need a Hugging Face Dinov2Model in safetensors \
(model.safetensors of facebook/dinov2-base, with its config.json beside it)";

/// The preprocessing sizes (the reference: shorter side 256, centre crop 224).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dinov2Input {
    pub resize: usize,
    pub crop: usize,
}

impl Default for Dinov2Input {
    fn default() -> Self {
        Self { resize: 256, crop: 224 }
    }
}

/// The architecture of a loaded model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Dinov2Arch {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch: usize,
    /// Side of the position-embedding grid the model was trained with (37 for 518 px).
    pub pos_grid: usize,
    pub eps: f64,
}

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ls1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Tensor,
}

impl Layer {
    fn forward(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / heads;
        let h = self.norm1.forward(x)?;
        let split = |l: &Linear| -> Result<Tensor> { Ok(h.apply(l)?.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (split(&self.q)?, split(&self.k)?, split(&self.v)?);
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?.apply(&self.out)?;
        let x = (x + y.broadcast_mul(&self.ls1)?)?;
        let m = self.norm2.forward(&x)?.apply(&self.fc1)?.gelu_erf()?.apply(&self.fc2)?;
        Ok((x + m.broadcast_mul(&self.ls2)?)?)
    }
}

/// A frozen DINOv2 (`Dinov2Model`) returning patch features.
pub struct Dinov2Features {
    arch: Dinov2Arch,
    input: Dinov2Input,
    patch_embed: Conv,
    cls: Tensor,
    /// Position embeddings for the input grid: (1, 1 + g*g, width).
    pos: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
    /// What made the features: the file, its fingerprint and the architecture.
    description: String,
}

/// `config.json` fields this loader reads (others are ignored).
#[derive(serde::Deserialize, Default)]
struct HfConfig {
    num_attention_heads: Option<usize>,
    layer_norm_eps: Option<f64>,
    #[serde(default)]
    use_swiglu_ffn: bool,
    hidden_act: Option<String>,
}

impl Dinov2Features {
    /// Load `path` (safetensors of a `Dinov2Model`) for the reference input sizes.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, Dinov2Input::default(), device)
    }

    /// [`Dinov2Features::load`] with other preprocessing sizes (tests use small ones).
    pub fn load_with(path: &Path, input: Dinov2Input, device: &Device) -> Result<Self> {
        let mut f = open_weights(path, NEEDS, device)?;
        if !f.contains("embeddings.cls_token") && f.contains("dinov2.embeddings.cls_token") {
            f = f.strip_prefix("dinov2.");
        }
        let hf = match path.parent().map(|d| d.join("config.json")).filter(|p| p.is_file()) {
            Some(cp) => {
                let text = std::fs::read_to_string(&cp).map_err(|e| Error::io(&cp, e))?;
                serde_json::from_str::<HfConfig>(&text).map_err(|e| Error::bad_file(&cp, format!("not a DINOv2 config.json: {e}")))?
            }
            None => HfConfig::default(),
        };
        if hf.use_swiglu_ffn {
            return Err(Error::bad_file(path, "a DINOv2 with a SwiGLU FFN (giant) is not supported; use dinov2-small/base/large"));
        }
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "gelu") {
            return Err(Error::bad_file(path, format!("hidden_act `{act}` is not supported (DINOv2 uses gelu)")));
        }
        let shape = |k: &str| -> Result<Vec<usize>> {
            f.tensors.get(k).map(|t| t.dims().to_vec()).ok_or_else(|| Error::bad_file(path, format!("no `{k}`: not a Hugging Face Dinov2Model. {NEEDS}")))
        };
        let width = match shape("embeddings.cls_token")?.as_slice() {
            &[1, 1, d] if d > 0 => d,
            d => return Err(Error::bad_file(path, format!("`embeddings.cls_token` has shape {d:?}; (1, 1, width) was expected"))),
        };
        let patch = match shape("embeddings.patch_embeddings.projection.weight")?.as_slice() {
            &[d, 3, p, q] if d == width && p == q && p > 0 => p,
            d => return Err(Error::bad_file(path, format!("`embeddings.patch_embeddings.projection.weight` has shape {d:?}; ({width}, 3, p, p) was expected"))),
        };
        let npos = match shape("embeddings.position_embeddings")?.as_slice() {
            &[1, n, d] if d == width && n > 1 => n - 1,
            d => return Err(Error::bad_file(path, format!("`embeddings.position_embeddings` has shape {d:?}; (1, 1 + g*g, {width}) was expected"))),
        };
        let pos_grid = (npos as f64).sqrt().round() as usize;
        if pos_grid * pos_grid != npos {
            return Err(Error::bad_file(path, format!("`embeddings.position_embeddings` holds {npos} patch positions, not a square grid")));
        }
        let mut ids: Vec<usize> = f.tensors.keys().filter_map(|k| k.strip_prefix("encoder.layer.")?.split('.').next()?.parse().ok()).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() || ids.iter().enumerate().any(|(i, &id)| i != id) {
            return Err(Error::bad_file(path, format!("encoder layers are numbered {ids:?}; 0..n was expected")));
        }
        let depth = ids.len();
        let heads = hf.num_attention_heads.unwrap_or((width / 64).max(1));
        if heads == 0 || width % heads != 0 {
            return Err(Error::bad_file(path, format!("{heads} attention heads do not divide the width {width}")));
        }
        let eps = hf.layer_norm_eps.unwrap_or(1e-6);
        if input.crop == 0 || input.crop > input.resize || !input.crop.is_multiple_of(patch) {
            return Err(Error::invalid("DINOv2 input", format!("crop {} of {} px with patch {patch}: the crop must be a multiple of the patch and at most the resize", input.crop, input.resize)));
        }
        let arch = Dinov2Arch { width, depth, heads, patch, pos_grid, eps };
        let d = width;
        let layers = (0..depth)
            .map(|i| {
                let p = format!("encoder.layer.{i}.");
                let hidden = shape(&format!("{p}mlp.fc1.weight"))?.first().copied().unwrap_or(0);
                Ok(Layer {
                    norm1: layer_norm(&f, &format!("{p}norm1."), d, eps)?,
                    q: linear(&f, &format!("{p}attention.attention.query."), d, d)?,
                    k: linear(&f, &format!("{p}attention.attention.key."), d, d)?,
                    v: linear(&f, &format!("{p}attention.attention.value."), d, d)?,
                    out: linear(&f, &format!("{p}attention.output.dense."), d, d)?,
                    ls1: f.get(&format!("{p}layer_scale1.lambda1"), &[d])?.to_dtype(DType::F32)?,
                    norm2: layer_norm(&f, &format!("{p}norm2."), d, eps)?,
                    fc1: linear(&f, &format!("{p}mlp.fc1."), d, hidden)?,
                    fc2: linear(&f, &format!("{p}mlp.fc2."), hidden, d)?,
                    ls2: f.get(&format!("{p}layer_scale2.lambda1"), &[d])?.to_dtype(DType::F32)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let patch_embed = Conv::load(&f, "embeddings.patch_embeddings.projection.", (3, d), (patch, patch), patch, (0, 0), true)?;
        let cls = f.get("embeddings.cls_token", &[1, 1, d])?.to_dtype(DType::F32)?;
        let pos_all = f.get("embeddings.position_embeddings", &[1, npos + 1, d])?.to_dtype(DType::F32)?;
        let g = input.crop / patch;
        let pos = if g == pos_grid {
            pos_all
        } else {
            let grid = pos_all.narrow(1, 1, npos)?.reshape((pos_grid, pos_grid, d))?.permute((2, 0, 1))?.contiguous()?;
            let m = bicubic_matrix_torch(pos_grid, g, device)?; // (g, pos_grid)
            let r = m.broadcast_matmul(&grid)?.broadcast_matmul(&m.t()?.contiguous()?)?; // (d, g, g)
            let r = r.permute((1, 2, 0))?.reshape((1, g * g, d))?;
            Tensor::cat(&[&pos_all.narrow(1, 0, 1)?, &r], 1)?
        };
        let norm = layer_norm(&f, "layernorm.", d, eps)?;
        let description = format!(
            "Hugging Face Dinov2Model {} (fingerprint {}): width {width}, depth {depth}, heads {heads}, patch {patch}; input shorter side {} px, centre crop {} px",
            path.display(),
            crate::data::provenance::file_fingerprint(path)?,
            input.resize,
            input.crop
        );
        Ok(Self { arch, input, patch_embed, cls, pos, layers, norm, description })
    }

    pub fn arch(&self) -> &Dinov2Arch {
        &self.arch
    }

    pub fn input(&self) -> Dinov2Input {
        self.input
    }

    /// Which file and architecture made the features (recorded in a cache's provenance).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Side of the patch grid of one image (16 for the 224 px crop with patch 14).
    pub fn grid(&self) -> usize {
        self.input.crop / self.arch.patch
    }

    /// The model input ("pixel_values") for images (B, 3, H, W) in [-1, 1].
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        preprocess(images, self.input)
    }

    /// Patch features (B, g*g, width) of preprocessed inputs (B, 3, crop, crop): the final
    /// LayerNorm's output without the CLS token.
    pub fn forward_preprocessed(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let t = self.patch_embed.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls.broadcast_as((b, 1, self.arch.width))?;
        let mut h = Tensor::cat(&[&cls, &t], 1)?.broadcast_add(&self.pos)?;
        for l in &self.layers {
            h = l.forward(&h, self.arch.heads)?;
        }
        let h = self.norm.forward(&h)?;
        let n = h.dim(1)?;
        Ok(h.narrow(1, 1, n - 1)?)
    }

    /// Patch features (B, g*g, width) of images (B, 3, H, W) in [-1, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_preprocessed(&self.preprocess(images)?)
    }

    /// [`Dinov2Features::features`] pooled to an (oh, ow) grid ([`pool_grid`]): the grid the
    /// GPT's alignment head produces (half the code grid).
    pub fn features_for_grid(&self, images: &Tensor, (oh, ow): (usize, usize)) -> Result<Tensor> {
        let g = self.grid();
        pool_grid(&self.features(images)?, (g, g), (oh, ow))
    }
}

/// The reference preprocessing (see the module documentation) of images (B, 3, H, W) in
/// [-1, 1]: returns (B, 3, crop, crop).
pub fn preprocess(images: &Tensor, input: Dinov2Input) -> Result<Tensor> {
    check_images("DINOv2 input", images)?;
    let x01 = ((images.to_dtype(DType::F32)? + 1.0)? * 0.5)?;
    // to_pil_image: * 255, truncated to u8 (a small margin absorbs float error).
    let q = ((x01 * 255.0)? + 1e-4)?.floor()?.clamp(0.0, 255.0)?;
    // PIL resizes the u8 image in two passes, horizontal then vertical, each rounded and
    // clipped to u8 (so bicubic overshoot is clipped between the passes); an unchanged side
    // is not resampled.
    let (_, _, h0, w0) = q.dims4()?;
    let (h, w) = shorter_side_size(h0, w0, input.resize);
    let u8_pass = |x: &Tensor, oh: usize, ow: usize| -> Result<Tensor> { Ok(resize(x, oh, ow, Resample::BicubicAntialias)?.round()?.clamp(0.0, 255.0)?) };
    let r = if w != w0 { u8_pass(&q, h0, w)? } else { q };
    let r = if h != h0 { u8_pass(&r, h, w)? } else { r };
    let r = (r / 255.0)?;
    if h < input.crop || w < input.crop {
        return Err(Error::invalid("DINOv2 input", format!("resized image {h}x{w} is smaller than the {} px crop", input.crop)));
    }
    let (top, left) = ((h - input.crop) / 2, (w - input.crop) / 2);
    let c = r.narrow(2, top, input.crop)?.narrow(3, left, input.crop)?;
    let dev = c.device();
    let mean = Tensor::new(&IMAGENET_MEAN, dev)?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&IMAGENET_STD, dev)?.reshape((1, 3, 1, 1))?;
    Ok(c.broadcast_sub(&mean)?.broadcast_div(&std)?)
}

/// The size after resizing the shorter side to `size` (the longer side `int(size * long /
/// short)`, as transformers' `get_resize_output_image_size`).
fn shorter_side_size(h: usize, w: usize, size: usize) -> (usize, usize) {
    if h <= w {
        (size, (size as u64 * w as u64 / h.max(1) as u64) as usize)
    } else {
        ((size as u64 * h as u64 / w.max(1) as u64) as usize, size)
    }
}

/// PyTorch's `interpolate(mode="bicubic", align_corners=False)` along one axis as an
/// (output, input) matrix: cubic convolution with A = -0.75, taps clamped at the borders.
pub fn bicubic_matrix_torch(input: usize, output: usize, device: &Device) -> Result<Tensor> {
    let a = -0.75f64;
    let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    let scale = input as f64 / output as f64;
    let mut m = vec![0f32; output * input];
    for i in 0..output {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let i0 = src.floor();
        let t = src - i0;
        let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let j = (i0 as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[i * input + j] += *wk as f32;
        }
    }
    Ok(Tensor::from_vec(m, (output, input), device)?)
}

/// Area pooling of patch features (B, h*w, D) on an (h, w) grid to an (oh, ow) grid
/// (`adaptive_avg_pool2d`: output cell i averages input rows floor(i*h/oh) to
/// ceil((i+1)*h/oh)). The reference recipe aligns a 32x32 code grid (16x16 after the head)
/// with DINOv2's 16x16 patches; other code grids get the DINOv2 grid pooled to theirs.
pub fn pool_grid(features: &Tensor, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Result<Tensor> {
    let (b, n, d) = features.dims3()?;
    if n != h * w || oh == 0 || ow == 0 {
        return Err(Error::invalid("feature grid", format!("{n} features on a {h}x{w} grid pooled to {oh}x{ow}")));
    }
    if (oh, ow) == (h, w) {
        return Ok(features.clone());
    }
    let dev = features.device();
    let mat = |inp: usize, out: usize| -> Result<Tensor> {
        let mut m = vec![0f32; out * inp];
        for i in 0..out {
            let (s, e) = (i * inp / out, ((i + 1) * inp).div_ceil(out));
            for j in s..e {
                m[i * inp + j] = 1.0 / (e - s) as f32;
            }
        }
        Ok(Tensor::from_vec(m, (out, inp), dev)?)
    };
    let (mh, mw) = (mat(h, oh)?, mat(w, ow)?);
    // (B, D, h, w) -> (B, D, oh, ow)
    let x = features.to_dtype(DType::F32)?.transpose(1, 2)?.reshape((b, d, h, w))?.contiguous()?;
    let y = mh.broadcast_matmul(&x)?.broadcast_matmul(&mw.t()?.contiguous()?)?;
    Ok(y.reshape((b, d, oh * ow))?.transpose(1, 2)?.contiguous()?)
}

/// The tensors of a random `Dinov2Model` in the Hugging Face key layout (tests and the parity
/// fixtures' shape checks): width `d`, `depth` layers, patch `p`, a `g` x `g` position grid.
pub fn random_weights(d: usize, depth: usize, p: usize, g: usize, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut rng = crate::util::rng(seed);
    let mut rnd = |shape: &[usize], scale: f32| -> Result<Tensor> {
        let len: usize = shape.iter().product();
        let v: Vec<f32> = (0..len).map(|_| (rand::Rng::random::<f32>(&mut rng) - 0.5) * 2.0 * scale).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let mut t = BTreeMap::new();
    t.insert("embeddings.cls_token".into(), rnd(&[1, 1, d], 1.0)?);
    t.insert("embeddings.mask_token".into(), Tensor::zeros((1, d), DType::F32, &dev)?);
    t.insert("embeddings.position_embeddings".into(), rnd(&[1, g * g + 1, d], 1.0)?);
    t.insert("embeddings.patch_embeddings.projection.weight".into(), rnd(&[d, 3, p, p], 0.2)?);
    t.insert("embeddings.patch_embeddings.projection.bias".into(), rnd(&[d], 0.1)?);
    for i in 0..depth {
        let pre = format!("encoder.layer.{i}.");
        for n in ["norm1", "norm2"] {
            t.insert(format!("{pre}{n}.weight"), (rnd(&[d], 0.2)? + 1.0)?);
            t.insert(format!("{pre}{n}.bias"), rnd(&[d], 0.1)?);
        }
        for (k, o, inp) in [
            ("attention.attention.query", d, d),
            ("attention.attention.key", d, d),
            ("attention.attention.value", d, d),
            ("attention.output.dense", d, d),
            ("mlp.fc1", 4 * d, d),
            ("mlp.fc2", d, 4 * d),
        ] {
            t.insert(format!("{pre}{k}.weight"), rnd(&[o, inp], 1.0 / (inp as f32).sqrt())?);
            t.insert(format!("{pre}{k}.bias"), rnd(&[o], 0.1)?);
        }
        t.insert(format!("{pre}layer_scale1.lambda1"), rnd(&[d], 1.0)?);
        t.insert(format!("{pre}layer_scale2.lambda1"), rnd(&[d], 1.0)?);
    }
    t.insert("layernorm.weight".into(), (rnd(&[d], 0.2)? + 1.0)?);
    t.insert("layernorm.bias".into(), rnd(&[d], 0.1)?);
    Ok(t)
}

//! DINO image embeddings for the DINO subject-fidelity score.
//!
//! [`DinoEncoder`]: DINO v1 ViT-S/16 (`dino_deitsmall16_pretrain.pth`, facebookresearch/dino
//! or timm `vit_small_patch16_224.dino` key names), CLS token after the final LayerNorm.
//! Preprocessing as DreamBench: resize the shorter side to 256 (bicubic, antialiased),
//! centre crop 224, ImageNet mean/std.
//!
//! [`DinoV2Encoder`]: DINOv2 ViT-S/14 through candle-transformers `models::dinov2`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

use super::preprocess::{center_crop, check_images, normalize_from_signed, resize_shorter, Resample, IMAGENET_MEAN, IMAGENET_STD};
use super::{layer_norm, linear, open_weights, var_builder, Conv, ImageEmbedder};
use crate::weights::TensorFile;
use crate::{Error, Result};

/// The file names of the DINO v1 ViT-S/16 weights looked for in a weights folder, in order.
pub const DINO_V1_FILES: [&str; 2] = ["dino_deitsmall16_pretrain.pth", "dino_vits16.safetensors"];

const DINO_NEEDS: &str = "DINO needs the DINO v1 ViT-S/16 backbone dino_deitsmall16_pretrain.pth from \
facebookresearch/dino (dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/), or timm's \
vit_small_patch16_224.dino safetensors";

#[derive(Clone, Debug)]
pub struct DinoConfig {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch: usize,
    pub mlp_ratio: usize,
    /// Shorter side after resizing, then the centre crop (the network's input size).
    pub resize: usize,
    pub crop: usize,
}

impl DinoConfig {
    pub fn vit_s16() -> Self {
        Self { dim: 384, depth: 12, heads: 6, patch: 16, mlp_ratio: 4, resize: 256, crop: 224 }
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self.norm1.forward(x)?.apply(&self.qkv)?.reshape((b, n, 3, self.heads, hd))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let attn = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?.apply(&self.proj)?;
        let x = (x + y)?;
        let h = self.norm2.forward(&x)?.apply(&self.fc1)?.gelu_erf()?.apply(&self.fc2)?;
        Ok((x + h)?)
    }
}

pub struct DinoEncoder {
    cfg: DinoConfig,
    patch_embed: Conv,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl DinoEncoder {
    pub fn load(cfg: DinoConfig, path: &Path, device: &Device) -> Result<Self> {
        let mut f = open_weights(path, DINO_NEEDS, device)?;
        for prefix in ["module.backbone.", "backbone.", "module."] {
            if f.contains(&format!("{prefix}cls_token")) {
                f = f.strip_prefix(prefix);
                break;
            }
        }
        Self::from_file(cfg, &f)
    }

    fn from_file(cfg: DinoConfig, f: &TensorFile) -> Result<Self> {
        let (d, p) = (cfg.dim, cfg.patch);
        if cfg.heads == 0 || d % cfg.heads != 0 || p == 0 || !cfg.crop.is_multiple_of(p) || cfg.crop > cfg.resize {
            return Err(Error::invalid("DINO config", format!("{cfg:?}")));
        }
        let np = (cfg.crop / p) * (cfg.crop / p);
        let patch_embed = Conv::load(f, "patch_embed.proj.", (3, d), (p, p), p, (0, 0), true)?;
        let cls_token = f.get("cls_token", &[1, 1, d])?.to_dtype(DType::F32)?;
        let pos_embed = f.get("pos_embed", &[1, np + 1, d])?.to_dtype(DType::F32)?;
        let hidden = d * cfg.mlp_ratio;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let b = format!("blocks.{i}.");
                Ok(Block {
                    norm1: layer_norm(f, &format!("{b}norm1."), d, 1e-6)?,
                    qkv: linear(f, &format!("{b}attn.qkv."), d, 3 * d)?,
                    proj: linear(f, &format!("{b}attn.proj."), d, d)?,
                    norm2: layer_norm(f, &format!("{b}norm2."), d, 1e-6)?,
                    fc1: linear(f, &format!("{b}mlp.fc1."), d, hidden)?,
                    fc2: linear(f, &format!("{b}mlp.fc2."), hidden, d)?,
                    heads: cfg.heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = layer_norm(f, "norm.", d, 1e-6)?;
        Ok(Self { cfg, patch_embed, cls_token, pos_embed, blocks, norm })
    }

    /// CLS embeddings of already preprocessed (B, 3, crop, crop) inputs.
    pub fn forward_preprocessed(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let t = self.patch_embed.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.dim))?;
        let mut h = Tensor::cat(&[&cls, &t], 1)?.broadcast_add(&self.pos_embed)?;
        for blk in &self.blocks {
            h = blk.forward(&h)?;
        }
        Ok(self.norm.forward(&h)?.get_on_dim(1, 0)?)
    }
}

/// Resize shorter side (bicubic, antialiased), centre crop, ImageNet normalisation.
fn dino_preprocess(images: &Tensor, resize: usize, crop: usize) -> Result<Tensor> {
    check_images("DINO input", images)?;
    let x = resize_shorter(&images.to_dtype(DType::F32)?, resize, Resample::BicubicAntialias)?;
    normalize_from_signed(&center_crop(&x, crop)?, IMAGENET_MEAN, IMAGENET_STD)
}

impl ImageEmbedder for DinoEncoder {
    fn name(&self) -> &'static str {
        "DINO"
    }
    fn embed(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_preprocessed(&dino_preprocess(images, self.cfg.resize, self.cfg.crop)?)
    }
}

/// DINOv2 (ViT-S/14, `dinov2_vits14_pretrain.pth`) CLS embeddings via candle-transformers.
/// candle's model ends in a classifier over [CLS, mean patch]; the head is replaced by a
/// selection of the CLS half, so the output is the normalised CLS token. Note that
/// candle's model uses LayerNorm eps 1e-5 (the reference uses 1e-6) and resamples the
/// 37x37 position grid to the input grid with nearest-neighbour (the reference: bicubic).
pub struct DinoV2Encoder {
    model: candle_transformers::models::dinov2::DinoVisionTransformer,
    dim: usize,
}

const DINOV2_NEEDS: &str = "DINOv2 needs dinov2_vits14_pretrain.pth from facebookresearch/dinov2 \
(dl.fbaipublicfiles.com/dinov2/dinov2_vits14/)";

impl DinoV2Encoder {
    /// `depth`, `dim`, `heads`: 12, 384, 6 for ViT-S/14.
    pub fn load(path: &Path, depth: usize, dim: usize, heads: usize, device: &Device) -> Result<Self> {
        let f = open_weights(path, DINOV2_NEEDS, device)?;
        let mut tensors = f.tensors;
        const CLASSES: usize = 1000;
        if dim > CLASSES {
            return Err(Error::invalid("DINOv2 width", format!("{dim} > {CLASSES} is not supported")));
        }
        let eye = Tensor::eye(dim, DType::F32, device)?;
        let head = Tensor::cat(&[&eye, &Tensor::zeros((dim, dim), DType::F32, device)?], 1)?;
        let head = Tensor::cat(&[&head, &Tensor::zeros((CLASSES - dim, 2 * dim), DType::F32, device)?], 0)?;
        tensors.insert("head.weight".into(), head);
        tensors.insert("head.bias".into(), Tensor::zeros(CLASSES, DType::F32, device)?);
        let vb = var_builder(tensors, device)?;
        let model = candle_transformers::models::dinov2::DinoVisionTransformer::new(vb, depth, dim, heads)
            .map_err(|e| Error::bad_file(path, format!("not a DINOv2 ViT (depth {depth}, dim {dim}): {e}")))?;
        Ok(Self { model, dim })
    }
}

impl ImageEmbedder for DinoV2Encoder {
    fn name(&self) -> &'static str {
        "DINOv2"
    }
    fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let x = dino_preprocess(images, 256, 224)?;
        // candle's model does not broadcast the CLS token over a batch: one image at a time
        let rows = (0..x.dim(0)?)
            .map(|i| Ok(self.model.forward(&x.narrow(0, i, 1)?)?.narrow(D::Minus1, 0, self.dim)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::nets::fixtures::{assert_close, input, path};
    use crate::eval::nets::subject_fidelity;

    fn tiny() -> DinoConfig {
        DinoConfig { dim: 32, depth: 2, heads: 2, patch: 4, mlp_ratio: 4, resize: 20, crop: 16 }
    }

    #[test]
    fn dino_v1_matches_pytorch_reference() -> Result<()> {
        let m = DinoEncoder::load(tiny(), &path("dino_vit.safetensors"), &Device::Cpu)?;
        let x = input("dino_in")?;
        assert_close(&m.embed(&x)?, "dino_cls", 1e-4);
        // a subject scored against itself is 100
        let s = subject_fidelity(&m, &[(x.clone(), x.clone())])?;
        assert!(s <= 100.0 + 1e-3 && s > -100.0);
        let one = x.narrow(0, 0, 1)?;
        let s = subject_fidelity(&m, &[(one.clone(), one)])?;
        assert!((s - 100.0).abs() < 1e-3, "{s}");
        Ok(())
    }

    #[test]
    fn dino_missing_file_and_bad_input_are_errors() {
        let err = DinoEncoder::load(DinoConfig::vit_s16(), Path::new("nowhere/dino.pth"), &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("dino_deitsmall16_pretrain.pth") && err.contains("nowhere/dino.pth"), "{err}");
        let m = DinoEncoder::load(tiny(), &path("dino_vit.safetensors"), &Device::Cpu);
        let bad = Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu);
        assert!(m.is_ok() && bad.is_ok());
        if let (Ok(m), Ok(bad)) = (m, bad) {
            assert!(m.embed(&bad).is_err());
        }
        let err = DinoV2Encoder::load(Path::new("nowhere/v2.pth"), 12, 384, 6, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("dinov2_vits14_pretrain.pth"), "{err}");
    }

    #[test]
    fn dinov2_returns_the_cls_embedding() -> Result<()> {
        // tiny random DINOv2 (dim 8, 1 block) in the official key layout
        let dev = Device::Cpu;
        let (d, n) = (8usize, 37 * 37 + 1);
        let mut rng_seed = 0u64;
        let mut rnd = |shape: &[usize]| -> Result<Tensor> {
            rng_seed += 1;
            let mut rng = crate::util::rng(rng_seed);
            let len: usize = shape.iter().product();
            let v: Vec<f32> = (0..len).map(|_| rand::Rng::random::<f32>(&mut rng) - 0.5).collect();
            Ok(Tensor::from_vec(v, shape, &dev)?)
        };
        let mut t = std::collections::HashMap::new();
        t.insert("cls_token".to_string(), rnd(&[1, 1, d])?);
        t.insert("pos_embed".to_string(), rnd(&[1, n, d])?);
        t.insert("patch_embed.proj.weight".to_string(), rnd(&[d, 3, 14, 14])?);
        t.insert("patch_embed.proj.bias".to_string(), rnd(&[d])?);
        for k in ["norm1", "norm2"] {
            t.insert(format!("blocks.0.{k}.weight"), Tensor::ones(d, DType::F32, &dev)?);
            t.insert(format!("blocks.0.{k}.bias"), rnd(&[d])?);
        }
        t.insert("norm.weight".to_string(), Tensor::ones(d, DType::F32, &dev)?);
        t.insert("norm.bias".to_string(), Tensor::zeros(d, DType::F32, &dev)?);
        for (k, o, i) in [("attn.qkv", 3 * d, d), ("attn.proj", d, d), ("mlp.fc1", 4 * d, d), ("mlp.fc2", d, 4 * d)] {
            t.insert(format!("blocks.0.{k}.weight"), rnd(&[o, i])?);
            t.insert(format!("blocks.0.{k}.bias"), rnd(&[o])?);
        }
        for k in ["ls1", "ls2"] {
            t.insert(format!("blocks.0.{k}.gamma"), rnd(&[d])?);
        }
        let dir = std::env::temp_dir().join(format!("tokenar_dinov2_{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let p = dir.join("v2.safetensors");
        crate::weights::save_safetensors(&p, &t, &Default::default())?;
        let m = DinoV2Encoder::load(&p, 1, d, 2, &dev)?;
        let x = (rnd(&[2, 3, 40, 48])? * 2.0)?;
        let e = m.embed(&x)?;
        assert_eq!(e.dims(), &[2, d]);
        // final LayerNorm with unit weight and zero bias: each CLS row has mean 0, variance 1
        let v = e.to_vec2::<f32>()?;
        for row in v {
            let mean: f32 = row.iter().sum::<f32>() / d as f32;
            let var: f32 = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / d as f32;
            assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-2, "{mean} {var}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

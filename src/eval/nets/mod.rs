//! Network-based image metrics with their standard backbones: LPIPS (SqueezeNet / AlexNet),
//! FID (the pytorch-fid InceptionV3), CLIP-I (CLIP ViT-B/32) and DINO (ViT-S/16 v1, DINOv2
//! as an option).
//!
//! Every network loads its standard weights from a local file the user supplies
//! (.safetensors, or a torch .pt/.pth read without executing pickle code). A missing file is
//! a [`crate::Error::BadFile`] naming the file and where it comes from, so a caller can skip
//! that metric and run the others. All networks take images as (B, 3, H, W) f32 in [-1, 1]
//! and do their own resizing and normalisation.

pub mod clip;
pub mod dino;
pub mod dinov2;
pub mod eigen;
pub mod fid;
pub mod inception;
pub mod lpips;
pub mod preprocess;

use std::collections::HashMap;
use image::RgbImage;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};

use crate::weights::TensorFile;
use crate::{Error, Result};

pub use clip::{ClipImageEncoder, ClipVisionSettings};
pub use dino::{DinoConfig, DinoEncoder, DinoV2Encoder, DINO_V1_FILES};
pub use fid::{fid_from_features, GaussianStats};
pub use inception::{FidInception, InceptionConfig};
pub use lpips::{Lpips, LpipsConfig, LpipsNet};

/// A network that maps images to one embedding vector each (CLIP-I, DINO, Inception pool3).
pub trait ImageEmbedder {
    /// Short metric name for reports ("CLIP-I", "DINO", ...).
    fn name(&self) -> &'static str;
    /// Embeddings (B, D) for images (B, 3, H, W) in [-1, 1].
    fn embed(&self, images: &Tensor) -> Result<Tensor>;
}

/// Read a weight file after checking that it exists; `needs` says which file the metric
/// needs and where it comes from, and is the message of the error for a missing file.
pub fn open_weights(path: &Path, needs: &str, device: &Device) -> Result<TensorFile> {
    if !path.is_file() {
        return Err(Error::bad_file(path, format!("weight file not found. {needs}")));
    }
    TensorFile::load(path, device)
}

/// A tensor map as an f32 `VarBuilder`, for the candle-transformers models.
pub(crate) fn var_builder(tensors: HashMap<String, Tensor>, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
    let tensors = crate::weights::to_dtype(&tensors, DType::F32)?;
    Ok(candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// The first of `names` present in the folder `dir`; otherwise the first name's path (the
/// network's loader then reports it as missing, with where it comes from).
pub fn find_weight_file(dir: &Path, names: &[&str]) -> PathBuf {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).unwrap_or_else(|| dir.join(names[0]))
}

/// Images as one (N, 3, H, W) batch in [-1, 1] (all of one size).
pub fn to_batch(images: &[&RgbImage], device: &Device) -> Result<Tensor> {
    let ts = images.iter().map(|i| crate::imageio::rgb_to_tensor(i, device)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&ts, 0)?)
}

/// Embeddings of a large image set, `batch` images at a time (bounds the activation memory,
/// e.g. for Inception at 299x299).
pub fn embed_in_batches(net: &dyn ImageEmbedder, images: &Tensor, batch: usize) -> Result<Tensor> {
    let n = images.dim(0)?;
    if batch == 0 || n == 0 {
        return Err(Error::invalid(net.name(), format!("cannot embed {n} images in batches of {batch}")));
    }
    let parts = (0..n)
        .step_by(batch)
        .map(|s| net.embed(&images.narrow(0, s, batch.min(n - s))?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Rows divided by their L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// Mean cosine similarity between every generated and every reference embedding of one
/// subject ((G, D) and (R, D)), on L2-normalised rows.
pub fn mean_pairwise_cosine(generated: &Tensor, reference: &Tensor) -> Result<f64> {
    let (g, dg) = generated.dims2()?;
    let (r, dr) = reference.dims2()?;
    if g == 0 || r == 0 || dg != dr {
        return Err(Error::invalid(
            "embeddings",
            format!("need non-empty (G,D) and (R,D) with equal D, got ({g},{dg}) and ({r},{dr})"),
        ));
    }
    let a = l2_normalize(&generated.to_dtype(DType::F32)?)?;
    let b = l2_normalize(&reference.to_dtype(DType::F32)?)?;
    let sim = a.matmul(&b.t()?)?;
    Ok(sim.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// DreamBench-style subject fidelity (CLIP-I or DINO): per subject the mean cosine over
/// generated x reference pairs, averaged over subjects, times 100.
pub fn subject_fidelity(
    net: &dyn ImageEmbedder,
    subjects: &[(Tensor, Tensor)], // (generated images, reference images) per subject
) -> Result<f64> {
    if subjects.is_empty() {
        return Err(Error::invalid(net.name(), "no subjects to score"));
    }
    let mut total = 0.0;
    for (gen, refs) in subjects {
        total += mean_pairwise_cosine(&net.embed(gen)?, &net.embed(refs)?)?;
    }
    Ok(100.0 * total / subjects.len() as f64)
}

/// `{prefix}weight` (out, in) and `{prefix}bias` (out) as a linear layer.
pub(crate) fn linear(f: &TensorFile, prefix: &str, din: usize, dout: usize) -> Result<candle_nn::Linear> {
    let w = f.get(&format!("{prefix}weight"), &[dout, din])?.to_dtype(DType::F32)?;
    let b = f.get(&format!("{prefix}bias"), &[dout])?.to_dtype(DType::F32)?;
    Ok(candle_nn::Linear::new(w, Some(b)))
}

/// `{prefix}weight`, `{prefix}bias` (d) as a LayerNorm (frozen networks: the fused op).
pub(crate) fn layer_norm(f: &TensorFile, prefix: &str, d: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
    let w = f.get(&format!("{prefix}weight"), &[d])?.to_dtype(DType::F32)?;
    let b = f.get(&format!("{prefix}bias"), &[d])?.to_dtype(DType::F32)?;
    Ok(candle_nn::LayerNorm::new(w, b, eps))
}

/// Plain conv2d with a per-axis padding (candle pads both axes alike, so unequal padding is
/// applied explicitly with zeros).
#[derive(Clone, Debug)]
pub(crate) struct Conv {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub pad: (usize, usize),
}

impl Conv {
    /// Load `{prefix}weight` (cout, cin, kh, kw) and, when `bias`, `{prefix}bias`.
    pub fn load(
        file: &TensorFile,
        prefix: &str,
        (cin, cout): (usize, usize),
        (kh, kw): (usize, usize),
        stride: usize,
        pad: (usize, usize),
        bias: bool,
    ) -> Result<Self> {
        let weight = file.get(&format!("{prefix}weight"), &[cout, cin, kh, kw])?.to_dtype(DType::F32)?;
        let bias = if bias {
            Some(file.get(&format!("{prefix}bias"), &[cout])?.to_dtype(DType::F32)?)
        } else {
            None
        };
        Ok(Self { weight, bias, stride, pad })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.pad;
        let y = if ph == pw {
            x.conv2d(&self.weight, ph, self.stride, 1, 1)?
        } else {
            let xp = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
            xp.conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    }
}

/// Max pooling with explicit padding and PyTorch's `ceil_mode` (windows that start inside
/// the padded input are kept).
pub(crate) fn max_pool(x: &Tensor, k: usize, stride: usize, pad: usize, ceil_mode: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let out = |n: usize| -> usize {
        let span = n + 2 * pad - k;
        let mut o = if ceil_mode { span.div_ceil(stride) + 1 } else { span / stride + 1 };
        if ceil_mode && (o - 1) * stride >= n + pad {
            o -= 1;
        }
        o
    };
    if h + 2 * pad < k || w + 2 * pad < k {
        return Err(Error::invalid("max pool", format!("input {h}x{w} is smaller than the {k}x{k} window")));
    }
    let (oh, ow) = (out(h), out(w));
    let extra_h = ((oh - 1) * stride + k).saturating_sub(h + 2 * pad);
    let extra_w = ((ow - 1) * stride + k).saturating_sub(w + 2 * pad);
    let x = pad_const(x, 2, pad, pad + extra_h, f32::MIN)?;
    let x = pad_const(&x, 3, pad, pad + extra_w, f32::MIN)?;
    Ok(x.max_pool2d_with_stride(k, stride)?)
}

fn pad_const(x: &Tensor, dim: usize, left: usize, right: usize, v: f32) -> Result<Tensor> {
    if left == 0 && right == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::new();
    let mut shape = x.dims().to_vec();
    if left > 0 {
        shape[dim] = left;
        parts.push(Tensor::full(v, shape.clone(), x.device())?);
    }
    parts.push(x.clone());
    if right > 0 {
        shape[dim] = right;
        parts.push(Tensor::full(v, shape, x.device())?);
    }
    Ok(Tensor::cat(&parts, dim)?)
}

/// 3x3 average pooling, stride 1, padding 1, `count_include_pad=False`.
pub(crate) fn avg_pool3_same_exclude_pad(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let sum = xp.avg_pool2d_with_stride(3, 1)?;
    let ones = Tensor::ones((1, 1, h, w), DType::F32, x.device())?;
    let count = ones.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)?;
    Ok(sum.broadcast_div(&count)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_mode_pool_and_exclusive_avg_pool() -> Result<()> {
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        // ceil mode: 4 -> 2 windows (second window is clipped at the border)
        let y = max_pool(&x, 3, 2, 0, true)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![10.0, 11.0, 14.0, 15.0]);
        let y = max_pool(&x, 3, 2, 0, false)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![10.0]);
        let ones = Tensor::ones((1, 2, 3, 5), DType::F32, &Device::Cpu)?;
        let a = avg_pool3_same_exclude_pad(&ones)?;
        assert!(a.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| (v - 1.0).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn pairwise_cosine_of_identical_sets_is_one() -> Result<()> {
        let e = Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &Device::Cpu)?;
        let same = mean_pairwise_cosine(&e.narrow(0, 0, 1)?, &e.narrow(0, 0, 1)?)?;
        assert!((same - 1.0).abs() < 1e-6);
        let cross = mean_pairwise_cosine(&e, &e)?;
        assert!((cross - 0.5).abs() < 1e-6, "{cross}");
        assert!(mean_pairwise_cosine(&e, &Tensor::zeros((1, 3), DType::F32, &Device::Cpu)?).is_err());
        Ok(())
    }
}

/// The PyTorch reference fixtures of `tests/fixtures/eval_nets` (see make_fixtures.py there).
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};

    use crate::weights::TensorFile;
    use crate::Result;

    /// A directory written by make_fixtures.py.
    pub struct Set {
        pub dir: PathBuf,
    }

    impl Set {
        pub fn path(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        pub fn input(&self, key: &str) -> Result<Tensor> {
            let f = TensorFile::load(self.path("inputs.safetensors"), &Device::Cpu)?;
            f.tensors.get(key).cloned().ok_or_else(|| crate::Error::invalid("fixture", key.to_string()))
        }

        pub fn expected(&self, key: &str) -> Vec<f32> {
            let text = std::fs::read_to_string(self.path("expected.json")).expect("expected.json");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            fn flat(v: &serde_json::Value, out: &mut Vec<f32>) {
                match v {
                    serde_json::Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
                    serde_json::Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN) as f32),
                    _ => {}
                }
            }
            let mut out = Vec::new();
            flat(&v[key], &mut out);
            assert!(!out.is_empty(), "no expected values for {key}");
            out
        }

        /// Max abs difference relative to the largest expected magnitude; returns it.
        pub fn assert_close(&self, got: &Tensor, key: &str, tol: f32) -> f32 {
            let got = got.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("tensor");
            let want = self.expected(key);
            assert_eq!(got.len(), want.len(), "{key}: length");
            let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
            let err = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(
                err <= tol * scale,
                "{key}: max abs error {err} (scale {scale}); got {:?} want {:?}",
                &got[..got.len().min(6)],
                &want[..want.len().min(6)]
            );
            err / scale
        }
    }

    pub fn tiny() -> Set {
        Set { dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval_nets") }
    }

    pub fn path(name: &str) -> PathBuf {
        tiny().path(name)
    }

    pub fn input(key: &str) -> Result<Tensor> {
        tiny().input(key)
    }

    pub fn assert_close(got: &Tensor, key: &str, tol: f32) {
        tiny().assert_close(got, key, tol);
    }
}

/// Full-size networks (random weights) against PyTorch, with timings; needs the files of
/// `make_fixtures.py --full DIR` and `TOKENAR_EVALNETS_FULL=DIR`.
#[cfg(test)]
mod full_size {
    use std::time::Instant;

    use super::*;

    #[test]
    #[ignore]
    fn full_size_networks_match_pytorch() -> Result<()> {
        let Some(dir) = std::env::var_os("TOKENAR_EVALNETS_FULL") else {
            eprintln!("TOKENAR_EVALNETS_FULL is not set; skipping");
            return Ok(());
        };
        let set = fixtures::Set { dir: dir.into() };
        let dev = Device::Cpu;
        let t = Instant::now();
        let m = Lpips::load(LpipsConfig::squeeze(), &set.path("lpips_squeeze.safetensors"), None, &dev)?;
        let d = m.distance(&set.input("lpips_in0")?, &set.input("lpips_in1")?)?;
        let e = set.assert_close(&d, "lpips_squeeze", 1e-4);
        eprintln!("LPIPS squeeze 2 pairs 64x64: rel err {e:.2e}, load+run {:.2?}", t.elapsed());
        let m = FidInception::load(InceptionConfig::fid(), &set.path("fid_inception.safetensors"), &dev)?;
        let x = set.input("inception_in")?;
        let t = Instant::now();
        let f = m.features(&x)?;
        eprintln!("Inception 2 images -> 299: {:.2?}", t.elapsed());
        let e = set.assert_close(&f, "inception_pool3", 1e-3);
        eprintln!("Inception pool3 ({} dims): rel err {e:.2e}", f.dim(1)?);
        let m = DinoEncoder::load(DinoConfig::vit_s16(), &set.path("dino_vit.safetensors"), &dev)?;
        let x = set.input("dino_in")?;
        let t = Instant::now();
        let f = m.embed(&x)?;
        eprintln!("DINO ViT-S/16 2 images: {:.2?}", t.elapsed());
        let e = set.assert_close(&f, "dino_cls", 1e-3);
        eprintln!("DINO CLS: rel err {e:.2e}");
        // FID at the real feature size: 200 samples of 2048-d features
        let mut rng = crate::util::rng(5);
        let mut feats = |n: usize, shift: f64| -> Vec<Vec<f64>> {
            (0..n).map(|_| (0..2048).map(|_| rand::Rng::random::<f64>(&mut rng) + shift).collect()).collect()
        };
        let (a, b) = (feats(200, 0.0), feats(200, 0.1));
        let t = Instant::now();
        let v = fid_from_features(&a, &b)?;
        eprintln!("FID 200 x 2048-d vs 200 x 2048-d: {v:.4} in {:.2?}", t.elapsed());
        let (sa, sb) = (GaussianStats::from_features(&a)?, GaussianStats::from_features(&b)?);
        let t = Instant::now();
        let w = sa.frechet_distance(&sb)?;
        eprintln!("FID from 2048-d statistics only: {w:.4} in {:.2?}", t.elapsed());
        assert!((v - w).abs() < 1e-4 * v.abs().max(1.0), "{v} vs {w}");
        Ok(())
    }
}

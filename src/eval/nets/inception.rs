//! The FID InceptionV3 of pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`, the
//! TensorFlow FID graph ported to PyTorch): pool3 features, 2048-d. Inputs are resized to
//! 299x299 with bilinear interpolation (align_corners=False, no antialiasing) and stay in
//! [-1, 1]. The FID variants of the mixed blocks are used: average pooling without counting
//! the padding in blocks A, C and E_1, max pooling in the last block E_2.
//! BatchNorm (eps 0.001) is folded into the convolutions at load time.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::preprocess::{check_images, resize, Resample};
use super::{avg_pool3_same_exclude_pad, max_pool, open_weights, Conv, ImageEmbedder};
use crate::weights::TensorFile;
use crate::{Error, Result};

const INCEPTION_NEEDS: &str = "FID needs the FID InceptionV3 weights pt_inception-2015-12-05-6726825d.pth from \
pytorch-fid (github.com/mseitzer/pytorch-fid/releases/download/fid_weights/)";

#[derive(Clone, Debug)]
pub struct InceptionConfig {
    /// Every channel width divided by this (1 for the real network; tests use reduced widths).
    pub width_div: usize,
    /// Input side after resizing (299 for FID).
    pub resize: usize,
}

impl InceptionConfig {
    pub fn fid() -> Self {
        Self { width_div: 1, resize: 299 }
    }
}

/// Loader state: the file and the width divisor.
struct Loader<'a> {
    f: &'a TensorFile,
    div: usize,
}

impl Loader<'_> {
    fn w(&self, c: usize) -> usize {
        (c / self.div).max(1)
    }

    /// BasicConv2d `{prefix}.conv` + `{prefix}.bn` folded; `cout` is the standard width.
    fn bc(&self, prefix: &str, cin: usize, cout: usize, k: (usize, usize), stride: usize, pad: (usize, usize)) -> Result<Conv> {
        let cout = self.w(cout);
        let mut conv = Conv::load(self.f, &format!("{prefix}.conv."), (cin, cout), k, stride, pad, false)?;
        let g = |n: &str| -> Result<Tensor> { Ok(self.f.get(&format!("{prefix}.bn.{n}"), &[cout])?.to_dtype(DType::F32)?) };
        let (gamma, beta, mean, var) = (g("weight")?, g("bias")?, g("running_mean")?, g("running_var")?);
        let scale = gamma.broadcast_div(&(var + 0.001)?.sqrt()?)?;
        conv.weight = conv.weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        conv.bias = Some((beta - mean.mul(&scale)?)?);
        Ok(conv)
    }
}

fn run(c: &Conv, x: &Tensor) -> Result<Tensor> {
    Ok(c.forward(x)?.relu()?)
}

fn chain(convs: &[Conv], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for c in convs {
        h = run(c, &h)?;
    }
    Ok(h)
}

enum Mixed {
    /// InceptionA: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    A { b1: Conv, b5: Vec<Conv>, b3: Vec<Conv>, pool: Conv },
    /// InceptionB (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2
    B { b3: Conv, b3dbl: Vec<Conv> },
    /// InceptionC: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1
    C { b1: Conv, b7: Vec<Conv>, b7dbl: Vec<Conv>, pool: Conv },
    /// InceptionD (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2
    D { b3: Vec<Conv>, b7x3: Vec<Conv> },
    /// InceptionE: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1; `max_pool` for E_2
    E { b1: Conv, b3_1: Conv, b3_2: [Conv; 2], b3dbl: Vec<Conv>, b3dbl_3: [Conv; 2], pool: Conv, max_pool: bool },
}

impl Mixed {
    fn a(l: &Loader, p: &str, cin: usize, pool_features: usize) -> Result<(Self, usize)> {
        let w = |c| l.w(c);
        let m = Mixed::A {
            b1: l.bc(&format!("{p}.branch1x1"), cin, 64, (1, 1), 1, (0, 0))?,
            b5: vec![
                l.bc(&format!("{p}.branch5x5_1"), cin, 48, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch5x5_2"), w(48), 64, (5, 5), 1, (2, 2))?,
            ],
            b3: vec![
                l.bc(&format!("{p}.branch3x3dbl_1"), cin, 64, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch3x3dbl_2"), w(64), 96, (3, 3), 1, (1, 1))?,
                l.bc(&format!("{p}.branch3x3dbl_3"), w(96), 96, (3, 3), 1, (1, 1))?,
            ],
            pool: l.bc(&format!("{p}.branch_pool"), cin, pool_features, (1, 1), 1, (0, 0))?,
        };
        Ok((m, w(64) + w(64) + w(96) + w(pool_features)))
    }

    fn b(l: &Loader, p: &str, cin: usize) -> Result<(Self, usize)> {
        let w = |c| l.w(c);
        let m = Mixed::B {
            b3: l.bc(&format!("{p}.branch3x3"), cin, 384, (3, 3), 2, (0, 0))?,
            b3dbl: vec![
                l.bc(&format!("{p}.branch3x3dbl_1"), cin, 64, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch3x3dbl_2"), w(64), 96, (3, 3), 1, (1, 1))?,
                l.bc(&format!("{p}.branch3x3dbl_3"), w(96), 96, (3, 3), 2, (0, 0))?,
            ],
        };
        Ok((m, w(384) + w(96) + cin))
    }

    fn c(l: &Loader, p: &str, cin: usize, c7: usize) -> Result<(Self, usize)> {
        let w = |c| l.w(c);
        let (k17, k71, p17, p71) = ((1, 7), (7, 1), (0, 3), (3, 0));
        let m = Mixed::C {
            b1: l.bc(&format!("{p}.branch1x1"), cin, 192, (1, 1), 1, (0, 0))?,
            b7: vec![
                l.bc(&format!("{p}.branch7x7_1"), cin, c7, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch7x7_2"), w(c7), c7, k17, 1, p17)?,
                l.bc(&format!("{p}.branch7x7_3"), w(c7), 192, k71, 1, p71)?,
            ],
            b7dbl: vec![
                l.bc(&format!("{p}.branch7x7dbl_1"), cin, c7, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch7x7dbl_2"), w(c7), c7, k71, 1, p71)?,
                l.bc(&format!("{p}.branch7x7dbl_3"), w(c7), c7, k17, 1, p17)?,
                l.bc(&format!("{p}.branch7x7dbl_4"), w(c7), c7, k71, 1, p71)?,
                l.bc(&format!("{p}.branch7x7dbl_5"), w(c7), 192, k17, 1, p17)?,
            ],
            pool: l.bc(&format!("{p}.branch_pool"), cin, 192, (1, 1), 1, (0, 0))?,
        };
        Ok((m, 4 * w(192)))
    }

    fn d(l: &Loader, p: &str, cin: usize) -> Result<(Self, usize)> {
        let w = |c| l.w(c);
        let m = Mixed::D {
            b3: vec![
                l.bc(&format!("{p}.branch3x3_1"), cin, 192, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch3x3_2"), w(192), 320, (3, 3), 2, (0, 0))?,
            ],
            b7x3: vec![
                l.bc(&format!("{p}.branch7x7x3_1"), cin, 192, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch7x7x3_2"), w(192), 192, (1, 7), 1, (0, 3))?,
                l.bc(&format!("{p}.branch7x7x3_3"), w(192), 192, (7, 1), 1, (3, 0))?,
                l.bc(&format!("{p}.branch7x7x3_4"), w(192), 192, (3, 3), 2, (0, 0))?,
            ],
        };
        Ok((m, w(320) + w(192) + cin))
    }

    fn e(l: &Loader, p: &str, cin: usize, max_pool: bool) -> Result<(Self, usize)> {
        let w = |c| l.w(c);
        let m = Mixed::E {
            b1: l.bc(&format!("{p}.branch1x1"), cin, 320, (1, 1), 1, (0, 0))?,
            b3_1: l.bc(&format!("{p}.branch3x3_1"), cin, 384, (1, 1), 1, (0, 0))?,
            b3_2: [
                l.bc(&format!("{p}.branch3x3_2a"), w(384), 384, (1, 3), 1, (0, 1))?,
                l.bc(&format!("{p}.branch3x3_2b"), w(384), 384, (3, 1), 1, (1, 0))?,
            ],
            b3dbl: vec![
                l.bc(&format!("{p}.branch3x3dbl_1"), cin, 448, (1, 1), 1, (0, 0))?,
                l.bc(&format!("{p}.branch3x3dbl_2"), w(448), 384, (3, 3), 1, (1, 1))?,
            ],
            b3dbl_3: [
                l.bc(&format!("{p}.branch3x3dbl_3a"), w(384), 384, (1, 3), 1, (0, 1))?,
                l.bc(&format!("{p}.branch3x3dbl_3b"), w(384), 384, (3, 1), 1, (1, 0))?,
            ],
            pool: l.bc(&format!("{p}.branch_pool"), cin, 192, (1, 1), 1, (0, 0))?,
            max_pool,
        };
        Ok((m, w(320) + 4 * w(384) + w(192)))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let parts = match self {
            Mixed::A { b1, b5, b3, pool } => {
                vec![run(b1, x)?, chain(b5, x)?, chain(b3, x)?, run(pool, &avg_pool3_same_exclude_pad(x)?)?]
            }
            Mixed::B { b3, b3dbl } => vec![run(b3, x)?, chain(b3dbl, x)?, max_pool(x, 3, 2, 0, false)?],
            Mixed::C { b1, b7, b7dbl, pool } => {
                vec![run(b1, x)?, chain(b7, x)?, chain(b7dbl, x)?, run(pool, &avg_pool3_same_exclude_pad(x)?)?]
            }
            Mixed::D { b3, b7x3 } => vec![chain(b3, x)?, chain(b7x3, x)?, max_pool(x, 3, 2, 0, false)?],
            Mixed::E { b1, b3_1, b3_2, b3dbl, b3dbl_3, pool, max_pool: use_max } => {
                let h3 = run(b3_1, x)?;
                let h3 = Tensor::cat(&[run(&b3_2[0], &h3)?, run(&b3_2[1], &h3)?], 1)?;
                let hd = chain(b3dbl, x)?;
                let hd = Tensor::cat(&[run(&b3dbl_3[0], &hd)?, run(&b3dbl_3[1], &hd)?], 1)?;
                let pooled = if *use_max { max_pool(x, 3, 1, 1, false)? } else { avg_pool3_same_exclude_pad(x)? };
                vec![run(b1, x)?, h3, hd, run(pool, &pooled)?]
            }
        };
        Ok(Tensor::cat(&parts, 1)?)
    }
}

pub struct FidInception {
    cfg: InceptionConfig,
    stem: Vec<Conv>, // 1a, 2a, 2b | pool | 3b, 4a | pool
    mixed: Vec<Mixed>,
    dim: usize,
}

impl FidInception {
    pub fn load(cfg: InceptionConfig, path: &Path, device: &Device) -> Result<Self> {
        let f = open_weights(path, INCEPTION_NEEDS, device)?;
        Self::from_file(cfg, &f)
    }

    fn from_file(cfg: InceptionConfig, f: &TensorFile) -> Result<Self> {
        if cfg.width_div == 0 || cfg.resize < 75 {
            return Err(Error::invalid("Inception config", format!("{cfg:?} (width_div >= 1, resize >= 75)")));
        }
        let l = Loader { f, div: cfg.width_div };
        let w = |c| l.w(c);
        let stem = vec![
            l.bc("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0))?,
            l.bc("Conv2d_2a_3x3", w(32), 32, (3, 3), 1, (0, 0))?,
            l.bc("Conv2d_2b_3x3", w(32), 64, (3, 3), 1, (1, 1))?,
            l.bc("Conv2d_3b_1x1", w(64), 80, (1, 1), 1, (0, 0))?,
            l.bc("Conv2d_4a_3x3", w(80), 192, (3, 3), 1, (0, 0))?,
        ];
        let mut c = w(192);
        let mut mixed = Vec::new();
        let mut push = |r: Result<(Mixed, usize)>, c: &mut usize| -> Result<()> {
            let (m, out) = r?;
            mixed.push(m);
            *c = out;
            Ok(())
        };
        push(Mixed::a(&l, "Mixed_5b", c, 32), &mut c)?;
        push(Mixed::a(&l, "Mixed_5c", c, 64), &mut c)?;
        push(Mixed::a(&l, "Mixed_5d", c, 64), &mut c)?;
        push(Mixed::b(&l, "Mixed_6a", c), &mut c)?;
        for (name, c7) in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)] {
            push(Mixed::c(&l, name, c, c7), &mut c)?;
        }
        push(Mixed::d(&l, "Mixed_7a", c), &mut c)?;
        push(Mixed::e(&l, "Mixed_7b", c, false), &mut c)?;
        push(Mixed::e(&l, "Mixed_7c", c, true), &mut c)?;
        Ok(Self { cfg, stem, mixed, dim: c })
    }

    /// Feature dimension (2048 for the real network).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// pool3 features (B, dim) of images (B, 3, H, W) in [-1, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        check_images("Inception input", images)?;
        let s = self.cfg.resize;
        let mut h = resize(&images.to_dtype(DType::F32)?, s, s, Resample::BilinearTorch)?;
        for (i, c) in self.stem.iter().enumerate() {
            h = run(c, &h)?;
            if i == 2 || i == 4 {
                h = max_pool(&h, 3, 2, 0, false)?;
            }
        }
        for m in &self.mixed {
            h = m.forward(&h)?;
        }
        Ok(h.mean((2, 3))?)
    }

    /// pool3 features as f64 rows, for [`super::fid_from_features`].
    pub fn features_f64(&self, images: &Tensor) -> Result<Vec<Vec<f64>>> {
        Ok(self.features(images)?.to_dtype(DType::F64)?.to_vec2::<f64>()?)
    }
}

impl ImageEmbedder for FidInception {
    fn name(&self) -> &'static str {
        "Inception pool3"
    }
    fn embed(&self, images: &Tensor) -> Result<Tensor> {
        self.features(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::nets::fid_from_features;
    use crate::eval::nets::fixtures::{assert_close, input, path};

    fn tiny() -> InceptionConfig {
        InceptionConfig { width_div: 32, resize: 75 }
    }

    #[test]
    fn fid_inception_matches_pytorch_reference() -> Result<()> {
        let m = FidInception::load(tiny(), &path("fid_inception.safetensors"), &Device::Cpu)?;
        assert_eq!(m.dim(), 64);
        let x = input("inception_in")?;
        assert_close(&m.features(&x)?, "inception_pool3", 1e-4);
        // FID of a feature set with itself is 0
        let set = Tensor::cat(&[&x, &x.flip(&[3])?, &(&x * 0.5)?], 0)?;
        let f = m.features_f64(&set)?;
        assert!(fid_from_features(&f, &f)?.abs() < 1e-6);
        // batching does not change the features
        let batched = crate::eval::nets::embed_in_batches(&m, &set, 4)?;
        let diff = (batched - m.features(&set)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn inception_missing_file_and_wrong_widths_are_named() {
        let err = FidInception::load(InceptionConfig::fid(), Path::new("w/inception.pth"), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("pt_inception-2015-12-05-6726825d.pth") && err.contains("w/inception.pth"), "{err}");
        let err = FidInception::load(InceptionConfig::fid(), &path("fid_inception.safetensors"), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("Conv2d_1a_3x3.conv.weight"), "{err}");
    }
}

//! LPIPS (Zhang et al. 2018) with the SqueezeNet 1.1 or AlexNet backbone and the v0.1
//! linear heads, as the `lpips` package and torchmetrics compute it: inputs in [-1, 1],
//! ScalingLayer `(x - shift) / scale`, per-layer features unit-normalised over channels,
//! squared difference, 1x1 linear head (no bias), spatial mean, sum over layers.
//!
//! Key names are those of the `lpips.LPIPS` module: `net.slice{s}.{i}.*` for the backbone
//! (torchvision feature indices kept) and `lin{l}.model.1.weight` for the heads. A
//! torchmetrics state dict (the same under an extra `net.` prefix) is accepted, and so is
//! the pair (lin-only file such as `weights/v0.1/squeeze.pth`, torchvision backbone file with
//! `features.{i}.*` keys).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::{max_pool, open_weights, preprocess::check_images, Conv};
use crate::weights::TensorFile;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LpipsNet {
    /// torchvision `squeezenet1_1` (LPIPS `net='squeeze'`, torchmetrics `net_type='squeeze'`).
    Squeeze,
    /// torchvision `alexnet` (LPIPS `net='alex'`).
    Alex,
}

#[derive(Clone, Debug)]
pub struct LpipsConfig {
    pub net: LpipsNet,
    /// Every channel width of the backbone divided by this (1 for the real network; tests
    /// use reduced widths).
    pub width_div: usize,
}

impl LpipsConfig {
    pub fn squeeze() -> Self {
        Self { net: LpipsNet::Squeeze, width_div: 1 }
    }
    pub fn alex() -> Self {
        Self { net: LpipsNet::Alex, width_div: 1 }
    }

    /// Which torchvision feature index belongs to which LPIPS slice (1-based).
    fn slice_of(&self, feature: usize) -> Option<usize> {
        let bounds: &[usize] = match self.net {
            LpipsNet::Squeeze => &[2, 5, 8, 10, 11, 12, 13],
            LpipsNet::Alex => &[2, 5, 8, 10, 12],
        };
        bounds.iter().position(|&b| feature < b).map(|s| s + 1)
    }

    fn needs(&self) -> &'static str {
        match self.net {
            LpipsNet::Squeeze => {
                "LPIPS SqueezeNet needs squeeze.pth from the `lpips` package (lpips/weights/v0.1/squeeze.pth, \
                 the lin0..lin6 heads) plus the torchvision squeezenet1_1 backbone (squeezenet1_1-b8a52dc0.pth), \
                 or one file holding a whole LPIPS / torchmetrics state dict"
            }
            LpipsNet::Alex => {
                "LPIPS AlexNet needs alex.pth from the `lpips` package (lpips/weights/v0.1/alex.pth, the lin0..lin4 \
                 heads) plus the torchvision alexnet backbone (alexnet-owt-7be5be79.pth), or one file holding a \
                 whole LPIPS / torchmetrics state dict"
            }
        }
    }
}

struct Fire {
    squeeze: Conv,
    expand1: Conv,
    expand3: Conv,
}

impl Fire {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.squeeze.forward(x)?.relu()?;
        let a = self.expand1.forward(&s)?.relu()?;
        let b = self.expand3.forward(&s)?.relu()?;
        Ok(Tensor::cat(&[a, b], 1)?)
    }
}

enum Backbone {
    Squeeze { conv0: Conv, fires: Vec<Fire> },
    Alex { convs: Vec<Conv> },
}

pub struct Lpips {
    cfg: LpipsConfig,
    backbone: Backbone,
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

impl Lpips {
    /// Load from one file with the whole LPIPS (or torchmetrics LPIPS) state dict, or from
    /// the lin-head file plus a torchvision backbone file.
    pub fn load(cfg: LpipsConfig, lin_path: &Path, backbone_path: Option<&Path>, device: &Device) -> Result<Self> {
        let mut file = open_weights(lin_path, cfg.needs(), device)?;
        if file.contains("net.lin0.model.1.weight") {
            file = file.strip_prefix("net.");
        }
        if let Some(bp) = backbone_path {
            let bb = open_weights(bp, cfg.needs(), device)?;
            for (k, v) in bb.tensors {
                if let Some(key) = canonical_backbone_key(&cfg, &k) {
                    file.tensors.insert(key, v);
                }
            }
        } else if !file.contains("net.slice1.0.weight") {
            return Err(Error::bad_file(
                lin_path,
                format!("holds no LPIPS backbone (`net.slice1.0.weight`); pass the backbone file too. {}", cfg.needs()),
            ));
        }
        Self::from_file(cfg, &file)
    }

    fn from_file(cfg: LpipsConfig, f: &TensorFile) -> Result<Self> {
        let w = |c: usize| (c / cfg.width_div).max(1);
        let key = |i: usize| -> String { format!("net.slice{}.{i}.", cfg.slice_of(i).unwrap_or(0)) };
        let (backbone, chns) = match cfg.net {
            LpipsNet::Squeeze => {
                let conv0 = Conv::load(f, &key(0), (3, w(64)), (3, 3), 2, (0, 0), true)?;
                let spec = [
                    (3, 16, 64),
                    (4, 16, 64),
                    (6, 32, 128),
                    (7, 32, 128),
                    (9, 48, 192),
                    (10, 48, 192),
                    (11, 64, 256),
                    (12, 64, 256),
                ];
                let mut cin = w(64);
                let mut fires = Vec::new();
                for (i, sq, ex) in spec {
                    let p = key(i);
                    let (sq, ex) = (w(sq), w(ex));
                    fires.push(Fire {
                        squeeze: Conv::load(f, &format!("{p}squeeze."), (cin, sq), (1, 1), 1, (0, 0), true)?,
                        expand1: Conv::load(f, &format!("{p}expand1x1."), (sq, ex), (1, 1), 1, (0, 0), true)?,
                        expand3: Conv::load(f, &format!("{p}expand3x3."), (sq, ex), (3, 3), 1, (1, 1), true)?,
                    });
                    cin = 2 * ex;
                }
                // relu1 output, then the concatenated expand outputs of fires 4, 7, 9, 10, 11, 12
                let chns = vec![w(64), 2 * w(64), 2 * w(128), 2 * w(192), 2 * w(192), 2 * w(256), 2 * w(256)];
                (Backbone::Squeeze { conv0, fires }, chns)
            }
            LpipsNet::Alex => {
                let spec = [(0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1)];
                let mut convs = Vec::new();
                for (i, cin, cout, k, s, p) in spec {
                    let cin = if i == 0 { 3 } else { w(cin) };
                    convs.push(Conv::load(f, &key(i), (cin, w(cout)), (k, k), s, (p, p), true)?);
                }
                (Backbone::Alex { convs }, [64, 192, 384, 256, 256].map(w).to_vec())
            }
        };
        let lins = chns
            .iter()
            .enumerate()
            .map(|(l, &c)| Ok(f.get(&format!("lin{l}.model.1.weight"), &[1, c, 1, 1])?.to_dtype(DType::F32)?))
            .collect::<Result<Vec<_>>>()?;
        let dev = lins[0].device().clone();
        let buffer = |k: &str, default: [f32; 3]| -> Result<Tensor> {
            let t = if f.contains(k) { f.get(k, &[1, 3, 1, 1])?.to_dtype(DType::F32)? } else { Tensor::new(&default, &dev)?.reshape((1, 3, 1, 1))? };
            Ok(t)
        };
        let shift = buffer("scaling_layer.shift", [-0.030, -0.088, -0.188])?;
        let scale = buffer("scaling_layer.scale", [0.458, 0.448, 0.450])?;
        Ok(Self { cfg, backbone, lins, shift, scale })
    }

    pub fn config(&self) -> &LpipsConfig {
        &self.cfg
    }

    /// The per-layer backbone features of already scaled inputs.
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut outs = Vec::new();
        match &self.backbone {
            Backbone::Squeeze { conv0, fires } => {
                let mut h = conv0.forward(x)?.relu()?;
                outs.push(h.clone());
                // fires 0..8 are features 3,4 | 6,7 | 9 | 10 | 11 | 12
                let groups: [&[usize]; 6] = [&[0, 1], &[2, 3], &[4], &[5], &[6], &[7]];
                for (g, idx) in groups.iter().enumerate() {
                    if g < 3 {
                        h = max_pool(&h, 3, 2, 0, true)?;
                    }
                    for &i in idx.iter() {
                        h = fires[i].forward(&h)?;
                    }
                    outs.push(h.clone());
                }
            }
            Backbone::Alex { convs } => {
                let mut h = x.clone();
                for (i, c) in convs.iter().enumerate() {
                    if i == 1 || i == 2 {
                        h = max_pool(&h, 3, 2, 0, false)?;
                    }
                    h = c.forward(&h)?.relu()?;
                    outs.push(h.clone());
                }
            }
        }
        Ok(outs)
    }

    /// LPIPS distance per pair: (B,) for two batches (B, 3, H, W) in [-1, 1].
    pub fn distance(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_images("LPIPS input", a)?;
        if a.dims() != b.dims() {
            return Err(Error::invalid("LPIPS input", format!("image batches differ in shape: {:?} vs {:?}", a.dims(), b.dims())));
        }
        let n = a.dim(0)?;
        let x = Tensor::cat(&[a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?], 0)?;
        let x = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?;
        let feats = self.features(&x)?;
        let mut total: Option<Tensor> = None;
        for (f, lin) in feats.iter().zip(&self.lins) {
            let norm = f.sqr()?.sum_keepdim(1)?.sqrt()?;
            let f = f.broadcast_div(&(norm + 1e-10)?)?;
            let d = (f.narrow(0, 0, n)? - f.narrow(0, n, n)?)?.sqr()?;
            let v = d.conv2d(lin, 0, 1, 1, 1)?; // (n,1,h,w)
            let v = v.flatten_from(1)?.mean(D::Minus1)?;
            total = Some(match total {
                Some(t) => (t + v)?,
                None => v,
            });
        }
        total.ok_or_else(|| Error::invalid("LPIPS", "network has no layers"))
    }

    /// Mean LPIPS over pairs (torchmetrics `reduction='mean'`).
    pub fn score(&self, a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok(self.distance(a, b)?.mean_all()?.to_dtype(DType::F64)?.to_scalar()?)
    }
}

/// `features.{i}.rest` (torchvision) -> `net.slice{s}.{i}.rest` (LPIPS).
fn canonical_backbone_key(cfg: &LpipsConfig, key: &str) -> Option<String> {
    let rest = key.strip_prefix("features.")?;
    let (idx, tail) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    Some(format!("net.slice{}.{i}.{tail}", cfg.slice_of(i)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::nets::fixtures::{assert_close, input, path};

    fn tiny(net: LpipsNet) -> LpipsConfig {
        LpipsConfig { net, width_div: if net == LpipsNet::Squeeze { 8 } else { 16 } }
    }

    #[test]
    fn squeeze_matches_pytorch_reference() -> Result<()> {
        let (a, b) = (input("lpips_in0")?, input("lpips_in1")?);
        let m = Lpips::load(tiny(LpipsNet::Squeeze), &path("lpips_squeeze.safetensors"), None, &Device::Cpu)?;
        assert_close(&m.distance(&a, &b)?, "lpips_squeeze", 1e-4);
        // the two-file layout: lin heads in a torch .pth + torchvision backbone
        let m2 = Lpips::load(
            tiny(LpipsNet::Squeeze),
            &path("lpips_squeeze_lin.pth"),
            Some(&path("squeezenet_backbone.safetensors")),
            &Device::Cpu,
        )?;
        assert_close(&m2.distance(&a, &b)?, "lpips_squeeze", 1e-4);
        // identical images are at distance 0
        let same = m.distance(&a, &a)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(same < 1e-6, "{same}");
        Ok(())
    }

    #[test]
    fn alex_matches_pytorch_reference() -> Result<()> {
        let (a, b) = (input("lpips_in0")?, input("lpips_in1")?);
        let m = Lpips::load(tiny(LpipsNet::Alex), &path("lpips_alex.safetensors"), None, &Device::Cpu)?;
        assert_close(&m.distance(&a, &b)?, "lpips_alex", 1e-4);
        Ok(())
    }

    #[test]
    fn missing_or_incomplete_files_name_what_is_needed() {
        let missing = std::path::PathBuf::from("no/such/squeeze.pth");
        let err = Lpips::load(LpipsConfig::squeeze(), &missing, None, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("squeeze.pth") && err.contains("lpips") && err.contains("squeezenet1_1"), "{err}");
        // lin heads without a backbone
        let err = Lpips::load(tiny(LpipsNet::Squeeze), &path("lpips_squeeze_lin.pth"), None, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("backbone"), "{err}");
        // wrong widths: the error names the key and both shapes
        let err = Lpips::load(LpipsConfig::squeeze(), &path("lpips_squeeze.safetensors"), None, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("net.slice1.0.weight"), "{err}");
    }
}

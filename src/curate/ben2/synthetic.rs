//! Seeded random BEN2 weights of any shape, under the checkpoint's key names: for speed
//! measurements at the published size (no download needed) and for tests of small models.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rand::Rng as _;

use super::swin::SwinConfig;
use super::Ben2Config;
use crate::weights::TensorFile;
use crate::Result;

impl Ben2Config {
    /// BEN_Base as published.
    pub fn published() -> Self {
        Self {
            swin: SwinConfig { patch: 4, embed: 128, depths: vec![2, 2, 18, 2], heads: vec![4, 8, 16, 32], window: 12, mlp_hidden: vec![512, 1024, 2048, 4096] },
            decoder: 128,
            head_hidden: 384,
        }
    }

    /// Parameters (the checkpoint's floats, the unused side outputs included).
    pub fn parameters(&self) -> usize {
        keys(self).iter().map(|(_, s, _)| s.iter().product::<usize>()).sum()
    }
}

/// (key, shape, fan-in; 0 for norm scales, which are drawn around 1).
fn keys(cfg: &Ben2Config) -> Vec<(String, Vec<usize>, usize)> {
    let mut k: Vec<(String, Vec<usize>, usize)> = Vec::new();
    let lin = |k: &mut Vec<_>, p: &str, din: usize, dout: usize, bias: bool| {
        k.push((format!("{p}weight"), vec![dout, din], din));
        if bias {
            k.push((format!("{p}bias"), vec![dout], din));
        }
    };
    let norm = |k: &mut Vec<(String, Vec<usize>, usize)>, p: &str, d: usize| {
        k.push((format!("{p}weight"), vec![d], 0));
        k.push((format!("{p}bias"), vec![d], 1));
    };
    let conv = |k: &mut Vec<(String, Vec<usize>, usize)>, p: &str, cin: usize, cout: usize, ks: usize| {
        k.push((format!("{p}weight"), vec![cout, cin, ks, ks], cin * ks * ks));
        k.push((format!("{p}bias"), vec![cout], cin * ks * ks));
    };
    let s = &cfg.swin;
    conv(&mut k, "backbone.patch_embed.proj.", 3, s.embed, s.patch);
    norm(&mut k, "backbone.patch_embed.norm.", s.embed);
    let t = (2 * s.window - 1) * (2 * s.window - 1);
    for i in 0..s.depths.len() {
        let d = s.width(i);
        for j in 0..s.depths[i] {
            let p = format!("backbone.layers.{i}.blocks.{j}.");
            norm(&mut k, &format!("{p}norm1."), d);
            k.push((format!("{p}attn.relative_position_bias_table"), vec![t, s.heads[i]], 1));
            lin(&mut k, &format!("{p}attn.qkv."), d, 3 * d, true);
            lin(&mut k, &format!("{p}attn.proj."), d, d, true);
            norm(&mut k, &format!("{p}norm2."), d);
            lin(&mut k, &format!("{p}mlp.fc1."), d, s.mlp_hidden[i], true);
            lin(&mut k, &format!("{p}mlp.fc2."), s.mlp_hidden[i], d, true);
        }
        if i + 1 < s.depths.len() {
            norm(&mut k, &format!("backbone.layers.{i}.downsample.norm."), 4 * d);
            lin(&mut k, &format!("backbone.layers.{i}.downsample.reduction."), 4 * d, 2 * d, false);
        }
        norm(&mut k, &format!("backbone.norm{i}."), d);
    }
    let e = cfg.decoder;
    let ins = [s.embed, s.width(0), s.width(1), s.width(2), s.width(3)];
    for (i, &c) in ins.iter().enumerate() {
        conv(&mut k, &format!("output{}.0.", i + 1), c, e, 3);
        conv(&mut k, &format!("sideout{}.0.", i + 1), e, 1, 3);
    }
    let mha = |k: &mut Vec<(String, Vec<usize>, usize)>, p: &str| {
        k.push((format!("{p}in_proj_weight"), vec![3 * e, e], e));
        k.push((format!("{p}in_proj_bias"), vec![3 * e], e));
        k.push((format!("{p}out_proj.weight"), vec![e, e], e));
        k.push((format!("{p}out_proj.bias"), vec![e], e));
    };
    for i in 0..5 {
        mha(&mut k, &format!("multifieldcrossatt.attention.{i}."));
    }
    for l in 1..=4 {
        let (din, dout) = if l % 2 == 1 { (e, 2 * e) } else { (2 * e, e) };
        lin(&mut k, &format!("multifieldcrossatt.linear{l}."), din, dout, true);
    }
    norm(&mut k, "multifieldcrossatt.norm1.", e);
    norm(&mut k, "multifieldcrossatt.norm2.", e);
    for b in 1..=4 {
        let p = format!("dec_blk{b}.");
        for i in 0..4 {
            mha(&mut k, &format!("{p}attention.{i}."));
        }
        lin(&mut k, &format!("{p}linear3."), e, 2 * e, true);
        lin(&mut k, &format!("{p}linear4."), 2 * e, e, true);
        norm(&mut k, &format!("{p}norm1."), e);
        norm(&mut k, &format!("{p}norm2."), e);
        conv(&mut k, &format!("{p}sal_conv."), e, 1, 1);
        conv(&mut k, &format!("conv{b}.0."), e, e, 3);
    }
    let h = cfg.head_hidden;
    conv(&mut k, "insmask_head.0.", e, h, 3);
    conv(&mut k, "insmask_head.3.", h, h, 3);
    conv(&mut k, "insmask_head.6.", h, e, 3);
    conv(&mut k, "shallow.0.", 3, e, 3);
    conv(&mut k, "upsample1.0.", e, e, 3);
    conv(&mut k, "upsample2.0.", e, e, 3);
    conv(&mut k, "output.0.", e, 1, 3);
    k
}

/// A checkpoint of `cfg` with seeded random values: weights uniform with variance 1 / fan-in,
/// norm scales around 1.
pub fn random_checkpoint(cfg: &Ben2Config, seed: u64, device: &Device) -> Result<TensorFile> {
    let mut rng = crate::util::rng(seed);
    let mut tensors = HashMap::new();
    for (key, shape, fan_in) in keys(cfg) {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if fan_in == 0 {
            (0..n).map(|_| 1.0 + rng.random_range(-0.1f32..0.1)).collect()
        } else {
            let a = (3.0 / fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-a..a)).collect()
        };
        tensors.insert(key, Tensor::from_vec(v, shape, device)?);
    }
    Ok(TensorFile { path: PathBuf::from(format!("random BEN2 weights (seed {seed})")), tensors, metadata: BTreeMap::new() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curate::ben2::{cut_out, Ben2};

    fn tiny() -> Ben2Config {
        Ben2Config {
            swin: SwinConfig { patch: 4, embed: 8, depths: vec![1, 2, 1, 1], heads: vec![1, 2, 2, 4], window: 5, mlp_hidden: vec![16, 24, 64, 64] },
            decoder: 8,
            head_hidden: 12,
        }
    }

    #[test]
    fn published_shape_counts_the_reference_parameters() {
        // BEN2_Base: Swin-B (about 87M without its classifier) plus the decoder
        let n = Ben2Config::published().parameters();
        assert!((90_000_000..100_000_000).contains(&n), "{n}");
    }

    #[test]
    fn a_random_model_reads_back_its_shape_and_cuts_out() -> Result<()> {
        let cfg = tiny();
        let f = random_checkpoint(&cfg, 3, &Device::Cpu)?;
        let net = Ben2::from_file(&f, &Device::Cpu)?;
        assert_eq!(net.cfg, cfg);
        let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 90]));
        let cut = cut_out(&net, &img, 512)?;
        assert_eq!(cut.matte.dims(), &[1, 1, 512, 512]);
        assert_eq!(cut.alpha.dimensions(), (40, 30));
        assert_eq!(cut.foreground.dimensions(), (40, 30));
        let m = cut.matte.flatten_all()?.to_vec1::<f32>()?;
        assert!(m.iter().all(|v| (0.0..=1.0).contains(v)));
        // a sample size that the decoder cannot pool is refused with the reason
        let err = cut_out(&net, &img, 448).unwrap_err().to_string();
        assert!(err.contains("multiple of 128"), "{err}");
        Ok(())
    }

    #[test]
    fn missing_or_misshapen_tensors_are_named() {
        let cfg = tiny();
        let mut f = random_checkpoint(&cfg, 3, &Device::Cpu).unwrap();
        f.tensors.remove("dec_blk2.linear3.weight");
        let err = Ben2::from_file(&f, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("dec_blk2.linear3.weight"), "{err}");
        let mut f = random_checkpoint(&cfg, 3, &Device::Cpu).unwrap();
        f.tensors.insert("output.0.weight".into(), Tensor::zeros((2, 8, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
        let err = Ben2::from_file(&f, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("output.0.weight"), "{err}");
        let f = TensorFile { path: "x.safetensors".into(), tensors: HashMap::new(), metadata: BTreeMap::new() };
        let err = Ben2::from_file(&f, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("not a BEN2"), "{err}");
    }
}

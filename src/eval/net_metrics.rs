//! The network metrics of the registry: LPIPS, FID, CLIP-I and DINO, each built from weight
//! files found in the metric context's weights folder (`--weights DIR`). A missing file fails
//! the constructor with a message naming the file and where it comes from, so the registry
//! skips that metric and the others still run.

use super::metric::{Column, MetricContext, SampleData, SampleMetric, SetFeatures, SetMetric};
use super::nets::{self, ClipImageEncoder, ClipVisionSettings, DinoConfig, DinoEncoder, FidInception, ImageEmbedder, InceptionConfig, Lpips, LpipsConfig};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use std::path::PathBuf;

/// The first of `names` present in the weights folder; otherwise the first name's path (the
/// network's loader then reports it as missing, with where it comes from).
fn find(ctx: &MetricContext, names: &[&str]) -> Result<PathBuf> {
    let dir = ctx.weights_dir.as_deref().ok_or_else(|| {
        Error::invalid("--weights", format!("network metrics need a weights folder (--weights DIR) holding one of: {}", names.join(", ")))
    })?;
    Ok(nets::find_weight_file(dir, names))
}

pub struct LpipsMetric {
    net: Lpips,
    device: Device,
}

pub fn lpips(ctx: &MetricContext) -> Result<Box<dyn SampleMetric>> {
    // Either one file with the whole state dict (lpips or torchmetrics layout), or the lpips
    // package's squeeze.pth plus the torchvision backbone.
    let whole = find(ctx, &["lpips_squeeze.safetensors", "lpips_squeeze.pth", "squeeze.pth"])?;
    let backbone = ctx
        .weights_dir
        .as_deref()
        .map(|d| d.join("squeezenet1_1-b8a52dc0.pth"))
        .filter(|p| p.is_file() && whole.file_name().map(|n| n == "squeeze.pth").unwrap_or(false));
    let net = Lpips::load(LpipsConfig::squeeze(), &whole, backbone.as_deref(), &ctx.device)?;
    Ok(Box::new(LpipsMetric { net, device: ctx.device.clone() }))
}

impl SampleMetric for LpipsMetric {
    fn columns(&self) -> Vec<Column> {
        vec![Column::new("lpips", "LPIPS", false)]
    }
    fn score(&self, d: &SampleData) -> Result<Vec<Option<f64>>> {
        let Some(t) = d.target else { return Ok(vec![None]) };
        let a = nets::to_batch(&[d.pred], &self.device)?;
        let b = nets::to_batch(&[t], &self.device)?;
        Ok(vec![Some(self.net.score(&a, &b)?)])
    }
}

/// CLIP-I or DINO: mean cosine (x100) between the generated image and each reference.
pub struct Fidelity {
    net: Box<dyn ImageEmbedder>,
    column: Column,
    device: Device,
}

impl SampleMetric for Fidelity {
    fn columns(&self) -> Vec<Column> {
        vec![self.column.clone()]
    }
    fn score(&self, d: &SampleData) -> Result<Vec<Option<f64>>> {
        if d.refs.is_empty() {
            return Ok(vec![None]);
        }
        let pred = nets::to_batch(&[d.pred], &self.device)?;
        let refs: Vec<&RgbImage> = d.refs.iter().collect();
        let subjects: Vec<(Tensor, Tensor)> = refs
            .iter()
            .map(|r| Ok((pred.clone(), nets::to_batch(&[*r], &self.device)?)))
            .collect::<Result<_>>()?;
        Ok(vec![Some(nets::subject_fidelity(self.net.as_ref(), &subjects)?)])
    }
}

pub fn clip_i(ctx: &MetricContext) -> Result<Box<dyn SampleMetric>> {
    let p = find(ctx, &["clip-vit-base-patch32.safetensors", "model.safetensors", "pytorch_model.bin"])?;
    let net = ClipImageEncoder::load(ClipVisionSettings::vit_b32(), &p, &ctx.device)?;
    Ok(Box::new(Fidelity { net: Box::new(net), column: Column::new("clip_i", "CLIP-I", true), device: ctx.device.clone() }))
}

pub fn dino(ctx: &MetricContext) -> Result<Box<dyn SampleMetric>> {
    let p = find(ctx, &nets::DINO_V1_FILES)?;
    let net = DinoEncoder::load(DinoConfig::vit_s16(), &p, &ctx.device)?;
    Ok(Box::new(Fidelity { net: Box::new(net), column: Column::new("dino", "DINO", true), device: ctx.device.clone() }))
}

pub struct FidFeatures {
    net: FidInception,
    device: Device,
}

pub fn fid_column() -> Column {
    Column::new("fid", "FID", false)
}

pub fn fid(ctx: &MetricContext) -> Result<Box<dyn SetMetric>> {
    let p = find(ctx, &["pt_inception-2015-12-05-6726825d.pth", "inception.safetensors"])?;
    Ok(Box::new(FidFeatures { net: FidInception::load(InceptionConfig::fid(), &p, &ctx.device)?, device: ctx.device.clone() }))
}

impl SetMetric for FidFeatures {
    fn features(&self, d: &SampleData) -> Result<SetFeatures> {
        let mut imgs = vec![d.pred];
        if let Some(t) = d.target {
            imgs.push(t);
        }
        let f = self.net.features_f64(&nets::to_batch(&imgs, &self.device)?)?;
        let mut it = f.into_iter();
        let pred = it.next().ok_or_else(|| Error::invalid("FID", "no features"))?;
        Ok(SetFeatures { pred, target: it.next() })
    }
}

/// FID between the generated and the real images.
pub fn fid_score(pred: &[Vec<f64>], target: &[Vec<f64>]) -> Result<f64> {
    nets::fid_from_features(pred, target)
}


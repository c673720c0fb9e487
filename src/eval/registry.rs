//! The registry: every metric `eval` knows, one [`MetricSpec`] line each, and the metrics
//! computed from pixels (PSNR / SSIM / MSE by region, edge F1, identity). The network metrics
//! live in `net_metrics`; what a metric is, in `metric`.

use super::identity;
use super::metric::{Column, MetricKind, MetricSpec, SampleData, SampleMetric};
use super::net_metrics;
use super::pixel::{self, Region};
use crate::error::Result;

/// The registry. Network metrics from `eval::nets` are added here, one line each.
pub fn builtin_metrics() -> Vec<MetricSpec> {
    vec![
        MetricSpec { name: "pixel", about: "PSNR, MSE, SSIM over the whole image against real.png", kind: MetricKind::Sample(|_| Ok(Box::new(PixelMetric::Whole))) },
        MetricSpec { name: "background", about: "PSNR, MSE, SSIM outside mask.png (background preservation)", kind: MetricKind::Sample(|_| Ok(Box::new(PixelMetric::Background))) },
        MetricSpec { name: "subject", about: "PSNR, MSE, SSIM inside mask.png (the subjects)", kind: MetricKind::Sample(|_| Ok(Box::new(PixelMetric::Subject))) },
        MetricSpec { name: "edges", about: "F1 of Canny edge maps (OpenCV 100/200) against real.png", kind: MetricKind::Sample(|_| Ok(Box::new(EdgeF1))) },
        MetricSpec { name: "identity", about: "identity accuracy (colour) and swap rate, and shape-aware identity (colour correlograms), from meta.json subject masks and references", kind: MetricKind::Sample(|_| Ok(Box::new(Identity))) },
        MetricSpec { name: "lpips", about: "LPIPS (SqueezeNet) against real.png; needs lpips_squeeze.safetensors or squeeze.pth (+ squeezenet1_1) in --weights", kind: MetricKind::Sample(net_metrics::lpips) },
        MetricSpec { name: "clip_i", about: "CLIP-I x100 (ViT-B/32) of the result vs each reference; needs clip-vit-base-patch32 weights in --weights", kind: MetricKind::Sample(net_metrics::clip_i) },
        MetricSpec { name: "dino", about: "DINO x100 (v1 ViT-S/16 CLS) of the result vs each reference; needs dino_deitsmall16_pretrain.pth in --weights", kind: MetricKind::Sample(net_metrics::dino) },
        MetricSpec { name: "fid", about: "FID (InceptionV3 pool3) of results vs real.png; needs pt_inception-2015-12-05-6726825d.pth in --weights", kind: MetricKind::Set { column: net_metrics::fid_column, build: net_metrics::fid, score: net_metrics::fid_score } },
    ]
}

enum PixelMetric {
    Whole,
    Background,
    Subject,
}

impl SampleMetric for PixelMetric {
    fn columns(&self) -> Vec<Column> {
        let (suffix, what) = match self {
            PixelMetric::Whole => ("", ""),
            PixelMetric::Background => ("_bg", " bg"),
            PixelMetric::Subject => ("_subj", " subj"),
        };
        vec![
            Column::new(&format!("psnr{suffix}"), &format!("PSNR{what}"), true),
            Column::new(&format!("ssim{suffix}"), &format!("SSIM{what}"), true),
            Column::new(&format!("mse{suffix}"), &format!("MSE{what}"), false),
        ]
    }

    fn score(&self, d: &SampleData) -> Result<Vec<Option<f64>>> {
        let Some((p, t, map)) = d.planar_and_ssim()? else { return Ok(vec![None; 3]) };
        let region = match (self, d.mask) {
            (PixelMetric::Whole, _) => Region::All,
            (PixelMetric::Background, Some(m)) => Region::Outside(m),
            (PixelMetric::Subject, Some(m)) => Region::Inside(m),
            (_, None) => return Ok(vec![None; 3]),
        };
        Ok(match pixel::region_scores(p, t, map, region)? {
            Some(s) => vec![Some(s.psnr), Some(s.ssim), Some(s.mse)],
            None => vec![None; 3],
        })
    }
}

struct EdgeF1;

impl SampleMetric for EdgeF1 {
    fn columns(&self) -> Vec<Column> {
        vec![Column::new("f1", "F1", true)]
    }

    fn score(&self, d: &SampleData) -> Result<Vec<Option<f64>>> {
        Ok(vec![match d.target {
            Some(t) => Some(super::edges::edge_f1(d.pred, t)?),
            None => None,
        }])
    }
}

struct Identity;

impl SampleMetric for Identity {
    fn columns(&self) -> Vec<Column> {
        vec![
            Column::new("id_acc", "ID acc", true),
            Column::new("id_swap", "Swap", false),
            Column::new("id_shape", "ID shape", true),
        ]
    }

    fn score(&self, d: &SampleData) -> Result<Vec<Option<f64>>> {
        let mut v = match identity::identity_score(d.pred, d.subjects)? {
            Some(s) => vec![Some(s.accuracy), Some(if s.swapped { 1.0 } else { 0.0 })],
            None => vec![None, None],
        };
        v.push(identity::structure_score(d.pred, d.subjects)?.map(|s| s.kept));
        Ok(v)
    }
}
